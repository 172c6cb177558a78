"""memory=ssd_stream on a small checkpoint whose every part is left on disk: outputs identical to the resident run,
pages held within the pool, and a file failing mid-run is one error, never a hang."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

from qvl_pipeline import Pipeline
from qvl_pipeline.config.load import load_config
from qvl_pipeline.container import make_container
from qvl_pipeline.errors import CheckpointError
from qvl_pipeline.memory_plan import GIB, stream_pool, workspace_bytes
from qvl_pipeline.slots.memory import model_bytes
from qvl_pipeline.warm_start import resident_pages
from qvl_plugins.memory import ssd_stream
from qvl_plugins.memory.paging import PAGE, Pager, supported
from qvl_plugins.memory.row_chunks import ChunkedHead

pytestmark = [pytest.mark.skipif(bool(supported()), reason="; ".join(supported()) or "-"),
              pytest.mark.filterwarnings("ignore::UserWarning")]

PROMPT = "Tell me about the lighthouse."
TOKENS = 10


def write_small_checkpoint(seed: int = 3, intermediate: int = 512, tied: bool = False) -> str:
    """A float32 checkpoint big enough that each decoder layer spans hundreds of pages (≈2.4 MiB each; with
    intermediate=64, ≈0.8 MiB: less than the 1 MiB head, which then streams in two row ranges)."""
    from qvl_pipeline.model.config import ModelConfig
    from qvl_pipeline.model.qwen3_vl import skeleton
    from qvl_pipeline.runtime.demo import ensure_demo_checkpoint

    hf = copy.deepcopy(load_config([]).model.hf_config)
    hf["tie_word_embeddings"] = tied
    hf["text_config"].update(hidden_size=256, intermediate_size=intermediate, num_attention_heads=4,
                             num_key_value_heads=2 if intermediate > 64 else 1, head_dim=64, num_hidden_layers=4)
    hf["text_config"]["rope_parameters"]["mrope_section"] = [16, 8, 8]
    hf["vision_config"].update(hidden_size=64, intermediate_size=128, out_hidden_size=256, depth=3)
    folder = ensure_demo_checkpoint(hf, seed, lambda cfg: skeleton(ModelConfig.from_hf_dict(cfg)))
    for path in folder.iterdir():        # written just now: dirty pages cannot leave the page cache until on disk
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return str(folder)


def all_on_disk_budget(overrides: list[str]) -> float:
    """The RAM budget (GiB) at which the planner leaves every part on disk: runtime + KV cache + the pool."""
    facts = make_container(load_config(overrides)).core.resolver().facts_for("memory")
    model = model_bytes(facts)
    disk = ("disk",) * len(model.layers)
    need = workspace_bytes() + model.kv(facts.context.positions) * len(model.layers) \
        + stream_pool(model, disk, "disk", "disk")
    return (need + PAGE) / GIB


def base(folder: str, kernels: str) -> list[str]:
    return [f"model.path={folder}", "progress=false", f"kernels={kernels}", "generate.max_context=256",
            "hardware=auto"]


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    old = os.environ.get("QVL_CACHE_DIR")
    os.environ["QVL_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    try:
        yield write_small_checkpoint()
    finally:
        if old is None:
            os.environ.pop("QVL_CACHE_DIR", None)
        else:
            os.environ["QVL_CACHE_DIR"] = old


def streamed_pipeline(folder: str, kernels: str, *extra: str) -> Pipeline:
    overrides = [*base(folder, kernels), "memory=ssd_stream", *extra]
    budget = all_on_disk_budget(overrides)
    return Pipeline.from_overrides([*overrides, f"memory.ram_budget_gb={budget:.9f}"])


def memory_plugin(pipe: Pipeline):
    return pipe.run_plan.resolver.resolve("memory")


@pytest.fixture(scope="module")
def small_folders(small_folder):
    return {"layers": small_folder, "head split": write_small_checkpoint(5, intermediate=64),
            "tied head split": write_small_checkpoint(6, intermediate=64, tied=True)}


@pytest.mark.parametrize(("kernels", "shape"), [
    ("torch_native", "layers"), ("int8_weight_only", "layers"), ("torch_native", "head split"),
    ("int8_weight_only", "head split"), ("torch_native", "tied head split"), ("int8_weight_only", "tied head split"),
])
def test_streamed_run_matches_the_resident_run(small_folders, kernels, shape, monkeypatch):
    monkeypatch.setenv("QVL_CACHE_DIR", os.environ["QVL_CACHE_DIR"])
    small_folder = small_folders[shape]
    resident = Pipeline.from_overrides([*base(small_folder, kernels), "memory=cpu"])
    want = resident.generate(PROMPT, max_new_tokens=TOKENS, temperature=0)
    want_image = resident.generate(PROMPT, resident.demo_images() or [], max_new_tokens=3, temperature=0)
    want_logits = resident.first_logits(PROMPT)
    del resident

    pipe = streamed_pipeline(small_folder, kernels)
    placement = pipe.loaded.placement
    n = len(placement.layers)
    assert placement.on_disk == {"vision", "embed", "head", *(f"layers.{i}" for i in range(n))}
    if shape.endswith("split"):
        assert isinstance(pipe.model.lm_head, ChunkedHead) and len(pipe.model.lm_head.pieces) == 2
    got = pipe.generate(PROMPT, max_new_tokens=TOKENS, temperature=0)
    assert got["token_ids"] == want["token_ids"]
    got_logits = pipe.first_logits(PROMPT)
    assert torch.allclose(got_logits, want_logits, rtol=0, atol=1e-5)
    assert torch.equal(got_logits, want_logits)             # the same bytes, the same kernels: bit-identical
    stats = memory_plugin(pipe).streaming.stats
    assert stats.units_read >= TOKENS * (n + 1)             # every streamed unit was read again for each token
    assert stats.peak_held <= memory_plugin(pipe).streaming.prefetcher.pool
    assert want_image["token_ids"] == pipe.generate(PROMPT, pipe.demo_images() or [], max_new_tokens=3,
                                                    temperature=0)["token_ids"]


def test_pages_held_stay_within_the_pool(tmp_path, monkeypatch):
    """With drop_page_cache=true, mincore(2) on every streamed unit while each layer computes: the page-cache bytes
    never exceed the pool by more than the kernel's read-around at the units' edges. (Its own checkpoint: no other
    model in this process maps these files.)"""
    monkeypatch.setenv("QVL_CACHE_DIR", str(tmp_path))
    pipe = streamed_pipeline(write_small_checkpoint(seed=4), "torch_native",
                             "+memory.options.ssd_stream.drop_page_cache=true")
    streaming = memory_plugin(pipe).streaming
    units = streaming.units()
    pool = streaming.prefetcher.pool
    slack = len(units) * 2 * 128 * 1024          # read-around may cache up to a window past each unit's ends
    samples = []

    def sample(module, args):
        samples.append(sum(resident_pages(e.address, e.length) * PAGE for u in units for e in u.residency.extents))

    handles = [layer.register_forward_pre_hook(sample) for layer in pipe.model.model.language_model.layers]
    pipe.generate(PROMPT, max_new_tokens=4, temperature=0)
    for handle in handles:
        handle.remove()
    total = sum(e.length for u in units for e in u.residency.extents)
    assert samples and total > 2 * pool                      # the test means something: most bytes must be out
    assert max(samples) <= pool + slack, (max(samples), pool, total)


class FailingPager(Pager):
    """A disk that fails on the n-th read."""

    def __init__(self, paths, drop_page_cache, fail_at: int = 5):
        super().__init__(paths, drop_page_cache)
        self.reads, self.fail_at = 0, fail_at

    def load(self, extents):
        self.reads += 1
        if self.reads >= self.fail_at:
            raise OSError(5, "Input/output error (injected)")
        return super().load(extents)


def test_a_failing_read_is_one_error_not_a_hang(small_folder, monkeypatch):
    monkeypatch.setenv("QVL_CACHE_DIR", os.environ["QVL_CACHE_DIR"])
    real = ssd_stream.attach_streaming
    monkeypatch.setattr(ssd_stream, "attach_streaming",
                        lambda **kw: real(**kw, pager_factory=lambda paths, drop: FailingPager(paths, drop)))
    pipe = streamed_pipeline(small_folder, "torch_native")
    outcome: dict = {}

    def run():
        try:
            pipe.generate(PROMPT, max_new_tokens=6, temperature=0)
        except BaseException as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive(), "generation hung after a failed read"
    error = outcome.get("error")
    assert isinstance(error, CheckpointError)
    assert "could not read" in error.message and "Input/output error (injected)" in error.message
    assert "\n" not in error.message


TRUNCATE_SCRIPT = textwrap.dedent("""
    import os, sys
    from qvl_pipeline import Pipeline
    from qvl_pipeline.errors import QvlError
    overrides = sys.argv[1:]
    pipe = Pipeline.from_overrides(overrides)
    pipe.generate("Tell me about the lighthouse.", max_new_tokens=3, temperature=0)
    streaming = pipe.run_plan.resolver.resolve("memory").streaming
    streaming.decoder.quiesce(in_use_too=True)   # nothing of the decoder is in memory now
    first = streaming.decoder.units[0].residency.extents[0]
    cache_file = [e for u in streaming.decoder.units for e in u.residency.extents if "quantized" in e.path][0]
    os.truncate(cache_file.path, cache_file.offset)   # every streamed linear of the decoder is gone
    try:
        pipe.generate("Tell me about the lighthouse.", max_new_tokens=3, temperature=0)
    except QvlError as exc:
        print(exc.message, file=sys.stderr)
        sys.exit(exc.exit_code)
    print("no error", file=sys.stderr)
""")


def test_a_file_truncated_mid_run_is_one_error(small_folder, tmp_path):
    """The quantised cache file shrinks between two requests: the next read fails with EFAULT (never SIGBUS) and
    the request ends with one CheckpointError (exit code 5). Run in a child process: a crash must not take pytest."""
    cache = tmp_path / "cache"
    overrides = [*base(small_folder, "int8_weight_only"), "memory=ssd_stream"]
    env = {**os.environ, "QVL_CACHE_DIR": str(cache), "PYTHONPATH": os.getcwd()}
    budget = subprocess.run([sys.executable, "-c", "import sys; from tests.runtime.test_ssd_stream import "
                             "all_on_disk_budget as b; print(b(sys.argv[1:]))", *overrides],
                            env=env, capture_output=True, text=True, timeout=300)
    assert budget.returncode == 0, budget.stderr
    run = subprocess.run([sys.executable, "-c", TRUNCATE_SCRIPT, *overrides,
                          f"memory.ram_budget_gb={float(budget.stdout):.9f}"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == CheckpointError.exit_code, (run.returncode, run.stderr[-2000:])
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("memory=ssd_stream could not read decoder layer 0"), run.stderr[-2000:]
    assert "quantized" in lines[-1]


def test_detach_restores_the_head_and_stops_streaming(small_folders, monkeypatch):
    """What runtime recovery does before moving parts: the head is the loaded one again, no hook fires, and the
    model still computes the same logits (pages given back are read again from the same files)."""
    from qvl_pipeline.runtime.assembly import model_parts

    monkeypatch.setenv("QVL_CACHE_DIR", os.environ["QVL_CACHE_DIR"])
    pipe = streamed_pipeline(small_folders["head split"], "torch_native")
    want = pipe.first_logits(PROMPT)
    memory = memory_plugin(pipe)
    assert isinstance(pipe.model.lm_head, ChunkedHead)
    prefetcher = memory.streaming.prefetcher
    memory.detach(model_parts(pipe.model))
    assert memory.streaming is None and not isinstance(pipe.model.lm_head, ChunkedHead)
    assert all(not layer._forward_pre_hooks for layer in pipe.model.model.language_model.layers)
    read = prefetcher.stats.units_read
    assert torch.equal(pipe.first_logits(PROMPT), want) and prefetcher.stats.units_read == read
    memory.attach(model_parts(pipe.model), pipe.loaded.placement)          # and back
    assert isinstance(pipe.model.lm_head, ChunkedHead)
    assert torch.equal(pipe.first_logits(PROMPT), want)
