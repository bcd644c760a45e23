"""Harness test of the main job (benchmarks/shootout.py): a few steps of a micro model."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import shootout  # noqa: E402

# the harness picks its own device (--device cpu here), runs CPU subprocess workers and
# measures host memory
pytestmark = pytest.mark.cpu_only(reason="benchmarks/shootout.py harness, --device cpu")

MICRO = ["--config", "micro", "--steps", "4", "--batch-size", "2", "--seq-len", "32",
         "--eval-every", "2", "--eval-batches", "1", "--device", "cpu", "--quiet",
         "--threads", "1"]   # one thread: fast even when other jobs share the cores


def test_in_process_table_and_files(tmp_path):
    threads = torch.get_num_threads()
    # --clip 0: per-layer mode is then the same arithmetic as normal stepping (with clipping
    # it clips per parameter, normal stepping the global norm)
    out = shootout.main(MICRO + ["--methods", "adamw,galore,galore_per_layer", "--clip", "0",
                                 "--in-process", "--out", str(tmp_path)])
    results = {r["method"]: r for r in out["results"]}
    assert list(results) == ["adamw", "galore", "galore_per_layer"]
    for r in results.values():
        assert r["error"] is None
        assert [s for s, _ in r["curve"]] == [0, 2, 4]
        assert 0 < r["val_loss"] < 6 and r["val_ppl"] > 1
        assert r["weights_b"] == r["params"] * 4
        assert r["tokens_per_s"] > 0
    adamw, galore, hooks = results["adamw"], results["galore"], results["galore_per_layer"]
    n_tensors = len(common.LlamaLM(common.get_config("micro")).state_dict())
    # exp_avg + exp_avg_sq per parameter, plus torch's float32 "step" tensor
    assert adamw["state_b"] == 2 * adamw["weights_b"] + 4 * n_tensors
    assert galore["state_b"] < adamw["state_b"]
    assert adamw["grads_b"] == galore["grads_b"] == adamw["weights_b"]
    assert hooks["grads_b"] < galore["grads_b"] and hooks["per_layer"] and hooks["step_ms"] is None
    # per-layer stepping is the same arithmetic as normal stepping
    assert hooks["val_loss"] == pytest.approx(galore["val_loss"], abs=1e-5)

    # the estimator's closed forms give exactly the bytes this run measured
    # (plus the rotary table, resident but not in the state_dict the run counts)
    import bench_memory
    import estimate_memory
    cfg = shootout.model_config(out["args"])
    acts = estimate_memory.activation_bytes(cfg, 2, 32, torch.float32, False)
    for name, r in results.items():
        est = estimate_memory.estimate(name, cfg, out["args"].rank, torch.float32, acts)
        assert (est["weights"], est["grads"], est["state"]) == (
            r["weights_b"] + bench_memory.rope_bytes(cfg, 4), r["grads_b"], r["state_b"]), name
        assert r["estimate_b"] == sum(est.values())
        peak = estimate_memory.peak_model(name, cfg, out["args"].rank, torch.float32, 2, 32)
        assert r["peak_model_b"] == peak["peak"] >= est["weights"] + est["state"] + max(
            est["grads"], est["activations"])

    assert torch.get_num_threads() == threads                  # --threads is undone
    table = out["table"]
    for name in ("adamw", "galore", "galore_per_layer ¹"):
        assert sum(line.startswith(f"| {name} |") for line in table.splitlines()) == 2
    assert "torch " + torch.__version__ in table and "--in-process" in table
    assert (tmp_path / "results.md").read_text() == table
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in saved["results"]] == list(results)
    if importlib.util.find_spec("matplotlib"):
        png = tmp_path / "shootout.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_subprocess_worker(tmp_path):
    out = shootout.main(MICRO + ["--steps", "2", "--methods", "adamw", "--no-plot",
                                 "--out", str(tmp_path)])
    (r,) = out["results"]
    assert r["error"] is None and r["peak_b"] and r["peak_above_b"] is not None
    assert set(p.name for p in tmp_path.iterdir()) == {"results.md", "results.json"}


def test_unknown_method_is_an_error():
    with pytest.raises(SystemExit, match="unknown method"):
        shootout.main(MICRO + ["--methods", "adamw,nope"])


def test_model_names_select_attention_and_mlp():
    import lowrank_optim as lo

    cfg = common.get_config("micro")
    model = common.LlamaLM(cfg)
    plain, projected = lo.param_groups(model, rank=8, target_modules=("attn", "mlp"))
    assert len(projected["params"]) == 7 * cfg.n_layers       # q k v o gate up down
    plain_ids = {id(p) for p in plain["params"]}
    assert id(model.embed.weight) in plain_ids and id(model.lm_head.weight) in plain_ids
    logits = model(torch.randint(0, 256, (2, 16)))
    assert logits.shape == (2, 16, cfg.vocab_size)


def test_corpus_from_data_path(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n" * 2000)
    (tmp_path / "b.bin").write_bytes(b"\x00\x01" * 100)       # binary: skipped
    corpus = common.load_corpus(str(tmp_path), val_fraction=0.1)
    assert corpus.train.dtype == torch.uint8
    assert corpus.train.numel() + corpus.val.numel() == 24000
    assert "split by position" in corpus.name
    default = common.load_corpus()                             # stdlib, split by file
    assert default.n_train_files > 10 * default.n_val_files > 0


def test_seeds_are_averaged(tmp_path):
    out = shootout.main(MICRO + ["--methods", "adamw,galore", "--seeds", "0,1", "--in-process",
                                 "--no-plot", "--out", str(tmp_path)])
    runs, results = out["runs"], {r["method"]: r for r in out["results"]}
    assert [(r["method"], r["seed"]) for r in runs] == [
        ("adamw", 0), ("adamw", 1), ("galore", 0), ("galore", 1)]
    assert runs[0]["val_loss"] != runs[1]["val_loss"]          # the seed changes the run
    for name, r in results.items():
        mine = [x for x in runs if x["method"] == name]
        assert r["val_ppl_seeds"] == [x["val_ppl"] for x in mine]
        assert r["val_ppl"] == pytest.approx(sum(r["val_ppl_seeds"]) / 2)
        assert r["curve"][-1][1] == pytest.approx(sum(x["val_loss"] for x in mine) / 2)
        assert r["peak_b"] == max(x["peak_b"] for x in mine)
    table = out["table"]
    assert "seeds 0, 1" in table and "| seed 0 | seed 1 | mean |" in table
    assert "galore validation ppl ≤ 1.03× adamw's" in table
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["runs"]) == 4 and len(saved["results"]) == 2


def test_bad_seeds_are_an_error():
    with pytest.raises(SystemExit, match="--seeds"):
        shootout.main(MICRO + ["--methods", "adamw", "--seeds", "0,0"])
    with pytest.raises(SystemExit, match="--seeds"):
        shootout.main(MICRO + ["--methods", "adamw", "--seeds", "a"])


def test_targets_table():
    def row(name, ppl, peak, tps=100.0, seeds=(0, 1, 2)):
        return dict(method=name, val_ppl=ppl, peak_above_b=peak, tokens_per_s=tps, error=None,
                    seeds=list(seeds))
    results = [row("adamw", 4.0, 100), row("galore", 4.1, 90, 95),
               row("qgalore_per_layer", 4.2, 80), row("loqt", 4.2, 120)]
    table = shootout.target_table(results)
    lines = {l.split(" | ")[0][2:]: l for l in table.splitlines()[2:]}
    assert lines["galore validation ppl ≤ 1.03× adamw's"].endswith("| yes |")
    assert lines["loqt validation ppl ≤ 1× galore's"].endswith("| **no** |")
    assert lines["peak memory above baseline of every low-rank method < adamw's"].endswith(
        "| **no** |")                                           # loqt's 120 > 100
    assert lines["qgalore_per_layer has the lowest peak memory above baseline"].endswith("| yes |")
    assert lines["galore tokens/s ≥ 0.9× adamw's"].endswith("| yes |")
    assert not any("qgalore validation" in l for l in lines)     # no plain qgalore run
    assert shootout.target_table([row("adamw8bit", 4.0, 1)]) == ""
    # one seed: the perplexity targets (on the mean of 3 seeds) are shown, not decided
    one = shootout.target_table([row("adamw", 4.0, 100, seeds=[0]), row("galore", 4.1, 90)])
    line = next(l for l in one.splitlines() if l.startswith("| galore validation"))
    assert "1 seed(s)" in line and line.endswith("| – |")


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                    reason="needs bitsandbytes")
def test_quantized_methods_match_the_estimator(tmp_path):
    import bench_memory
    import estimate_memory
    out = shootout.main(MICRO + ["--steps", "2", "--methods", "qgalore,qgalore_per_layer,loqt",
                                 "--clip", "0", "--in-process", "--no-plot",
                                 "--out", str(tmp_path)])
    cfg = shootout.model_config(out["args"])
    acts = estimate_memory.activation_bytes(cfg, 2, 32, torch.float32, False)
    for r in out["results"]:
        assert r["error"] is None, r["error"]
        est = estimate_memory.estimate(r["method"], cfg, out["args"].rank, torch.float32, acts)
        assert (est["weights"], est["grads"], est["state"]) == (
            r["weights_b"] + bench_memory.rope_bytes(cfg, 4), r["grads_b"], r["state_b"]), \
            r["method"]
    by = {r["method"]: r for r in out["results"]}
    assert by["qgalore_per_layer"]["grads_b"] < by["qgalore"]["grads_b"]
    assert by["qgalore_per_layer"]["val_loss"] == pytest.approx(by["qgalore"]["val_loss"],
                                                                abs=1e-5)


def test_peak_models_block_is_the_block_that_activation_bytes_counts():
    """The peak model walks backward block by block with ``block_bytes``: one more layer
    adds exactly that many saved bytes to ``activation_bytes`` (both with flash
    attention's saves, not the math path's attention matrix)."""
    import dataclasses

    import estimate_memory
    cfg = common.get_config("micro")
    deeper = dataclasses.replace(cfg, n_layers=cfg.n_layers + 1)
    for dt in (torch.float32, torch.bfloat16):
        grow = (estimate_memory.activation_bytes(deeper, 2, 32, dt, False)
                - estimate_memory.activation_bytes(cfg, 2, 32, dt, False))
        assert grow == estimate_memory.block_bytes(cfg, 2, 32, dt) > 0


def test_clipping_global_and_per_parameter(tmp_path):
    """--clip (default 1.0): the global norm in normal stepping, each parameter's in
    per-layer mode; the report names which."""
    methods = ["--methods", "adamw,galore_per_layer", "--in-process", "--no-plot"]
    clipped = shootout.main(MICRO + methods + ["--out", str(tmp_path / "a")])
    plain = shootout.main(MICRO + methods + ["--clip", "0", "--out", str(tmp_path / "b")])
    by, ref = ({r["method"]: r for r in o["results"]} for o in (clipped, plain))
    assert clipped["args"].clip == 1.0                        # the default
    adamw, hooks = by["adamw"], by["galore_per_layer"]
    assert (adamw["clipping"], hooks["clipping"]) == ("global", "per-parameter")
    assert adamw["trained_params"] == hooks["trained_params"] > 0
    # the micro model's gradient norm starts above 1: the clip acts, and changes the run
    assert adamw["grad_norm_mean"] > 1 and 0 < adamw["clipped_frac"] <= 1
    assert hooks["grad_norm_mean"] is None                     # no global norm in that mode
    for name in by:
        assert by[name]["val_loss"] != ref[name]["val_loss"], name
        assert ref[name]["clipping"] == "none" and ref[name]["grad_norm_mean"] is None
    table = clipped["table"]
    assert "gradient clipping at norm 1 (global; per parameter in per-layer mode" in table
    lr = {n: common.METHODS[n].lr for n in common.METHODS}
    assert f"| adamw | {lr['adamw']:g} | global 1 |" in table
    assert f"| galore_per_layer ¹ | {lr['galore_per_layer']:g} | per-param 1 |" in table
    assert "## Gradient clipping" in table and "max_grad_norm_per_param=clip" in table
    assert "no grad clipping" in plain["table"] and "## Gradient clipping" not in plain["table"]
    with pytest.raises(SystemExit):
        shootout.main(MICRO + ["--methods", "adamw", "--clip", "-1"])


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                    reason="needs bitsandbytes")
def test_global_clip_covers_int8_weights(tmp_path):
    """Q-GaLore's INT8 weights have an ordinary ``.grad``: the global clip counts and
    scales them (the report says it covers every trained tensor), as per-layer mode does."""
    out = shootout.main(MICRO + ["--steps", "2", "--methods", "qgalore,qgalore_per_layer",
                                 "--in-process", "--no-plot", "--out", str(tmp_path)])
    by = {r["method"]: r for r in out["results"]}
    trained = len(common.LlamaLM(common.get_config("micro")).state_dict())
    assert by["qgalore"]["trained_params"] == by["qgalore_per_layer"]["trained_params"] == trained
    table = out["table"]
    assert f"| qgalore | {common.METHODS['qgalore'].lr:g} | global 1 |" in table
    assert f"all {trained} trained tensors" in table


def test_parse_sweep():
    names = ["adamw", "adamw8bit", "galore", "galore_per_layer", "loqt_nq"]
    lrs = dict(adamw=1.5e-3, adamw8bit=1.5e-3, galore=2e-2, galore_per_layer=2e-2, loqt_nq=2e-2)
    grid, inherits = shootout.parse_sweep("0.5,1,2", names, lrs)
    assert grid == {"adamw": [7.5e-4, 1.5e-3, 3e-3], "galore": [1e-2, 2e-2, 4e-2],
                    "loqt_nq": [1e-2, 2e-2, 4e-2]}             # loqt not run: swept itself
    assert inherits == {"adamw8bit": "adamw", "galore_per_layer": "galore"}
    grid, inherits = shootout.parse_sweep("adamw=1e-3:2e-3,galore_per_layer=1e-2", names, lrs)
    assert grid == {"adamw": [1e-3, 2e-3], "galore": [2e-2], "galore_per_layer": [1e-2],
                    "loqt_nq": [2e-2]}                         # no multipliers: own rate only
    assert inherits == {"adamw8bit": "adamw"}                  # an explicit grid is swept
    for bad in ("0,1", "x", "nope=1e-3", "adamw=-1"):
        with pytest.raises(SystemExit, match="--lr-sweep"):
            shootout.parse_sweep(bad, names, lrs)


def test_selection_windows_are_between_the_reported_ones():
    corpus = common.load_corpus()
    b = common.Batches(corpus, 4, 32, 0, 2, torch.device("cpu"))
    assert sum(x.shape[0] for x, _ in b.val) == 8 and sum(x.shape[0] for x, _ in b.select) == 7
    assert b.select_disjoint
    reported = {tuple(w.tolist()) for x, _ in b.val for w in x}
    assert not reported & {tuple(w.tolist()) for x, _ in b.select for w in x}


def test_lr_sweep_picks_on_the_selection_windows(tmp_path):
    out = shootout.main(MICRO + ["--steps", "3", "--methods", "adamw,galore,galore_per_layer",
                                 "--lr-sweep", "0.5,2", "--seeds", "0,1", "--in-process",
                                 "--no-plot", "--out", str(tmp_path)])
    sweep, runs, args = out["sweep"], out["runs"], out["args"]
    lr = {n: common.METHODS[n].lr for n in ("adamw", "galore")}
    assert [(r["method"], r["lr"], r["seed"]) for r in sweep] == [
        (n, pytest.approx(lr[n] * m), 0) for n in lr for m in (0.5, 2)]
    for name in ("adamw", "galore"):
        mine = [r for r in sweep if r["method"] == name]
        best = min(mine, key=lambda r: r["select_loss"])
        assert args.lrs[name] == best["lr"]
        assert best["select_loss"] != best["val_loss"]         # other windows than reported
        # the winner's seed-0 run is reused, not run again
        (seed0,) = [r for r in runs if r["method"] == name and r["seed"] == 0]
        assert seed0["val_loss"] == best["val_loss"] and seed0["lr"] == best["lr"]
    assert args.lrs["galore_per_layer"] == args.lrs["galore"]  # inherited, not swept
    assert sorted((r["method"], r["seed"]) for r in runs) == sorted(
        (n, s) for n in ("adamw", "galore", "galore_per_layer") for s in (0, 1))
    by = {r["method"]: r for r in out["results"]}
    assert all(by[n]["lr"] == args.lrs[n] for n in by)
    table = out["table"]
    assert "## Learning-rate sweep" in table and table.count("**best**") == 2
    assert "galore_per_layer takes galore's rate" in table
    assert "mean of seed 1 (not used to choose the rate)" in table
    assert "the best of `--lr-sweep` per method" in table
    assert not (tmp_path / "partial.json").exists()
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["sweep"]) == 4


def test_resume_reuses_the_runs_of_a_run_cut_short(tmp_path):
    base = MICRO + ["--steps", "2", "--lr-sweep", "0.5,2", "--seeds", "0,1", "--in-process",
                    "--no-plot"]
    first = shootout.main(base + ["--methods", "adamw,galore", "--out", str(tmp_path / "a")])
    saved = json.loads((tmp_path / "a" / "results.json").read_text())
    # what partial.json holds when the run is cut short after adamw's sweep
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps(dict(argv=saved["argv"], sweep=saved["sweep"][:2], runs=[])))
    again = shootout.main(base + ["--methods", "adamw", "--resume", str(partial),
                                  "--out", str(tmp_path / "b")])
    lr = common.METHODS["adamw"].lr
    assert [tuple(x) for x in again["args"].resumed] == [
        ("adamw", 0, pytest.approx(lr / 2)), ("adamw", 0, pytest.approx(2 * lr))]
    (r,) = again["results"]
    ref = next(x for x in first["results"] if x["method"] == "adamw")
    assert r["lr"] == ref["lr"] and r["val_ppl_seeds"] == ref["val_ppl_seeds"]
    assert "taken from the run cut short" in again["table"]
    with pytest.raises(SystemExit, match="differs in steps"):
        shootout.main(base + ["--steps", "3", "--methods", "adamw", "--resume", str(partial),
                              "--out", str(tmp_path / "c")])
    # runs are matched by method, seed and rate: a grid that adds a rate runs only that one
    # (here written per method); a run without a sweep cannot reuse a sweep's runs
    rest = ["--steps", "2", "--seeds", "0,1", "--in-process", "--no-plot", "--methods", "adamw",
            "--resume", str(partial)]
    wider = shootout.main(MICRO + rest + ["--lr-sweep", f"adamw={lr / 2:g}:{lr:g},galore=1e-3",
                                          "--out", str(tmp_path / "d")])
    assert [tuple(x) for x in wider["args"].resumed] == [("adamw", 0, pytest.approx(lr / 2))]
    assert [r["lr"] for r in wider["sweep"]] == pytest.approx([lr / 2, lr])
    with pytest.raises(SystemExit, match="one run sweeps, the other does not"):
        shootout.main(MICRO + rest + ["--out", str(tmp_path / "e")])


def test_method_specs_carry_optimizer_keywords():
    """``NAME+key=value`` is the registry entry with extra optimizer keywords (the old
    bench_refresh_policy / bench_lazy runs are such variants of the shoot-out)."""
    m = common.method("loqt+update_proj_gap=50+state_on_merge=project")
    assert m.kwargs == {"update_proj_gap": 50, "state_on_merge": "project"}
    assert m.parent == "loqt" and m.lr == common.METHODS["loqt"].lr and not m.default
    assert common.method("galore_randomized").kwargs == {"svd": "randomized"}
    for bad in ("nope", "galore+svd", "galore+=1"):
        with pytest.raises(ValueError):
            common.method(bad)
