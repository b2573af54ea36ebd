"""Accelerated backends on the tiny preset: each matches eager, and swapping adapters leaves no trace.

The LoRAs here are milder than tests/test_adapters.py's (std 0.15): strong enough to change the image
everywhere, but not so strong that attention saturates and a last-bit difference in summation order
(which every backend has) grows into a different picture.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from safetensors.torch import save

from actors.backends import BackendError, adaptable_layers, check_backend, make_backend
from actors.generate import draw
from actors.lora_map import InPlaceLoras, LoraMapError, delta, lora_layers, switch_updates
from actors.presets import build_preset
from helpers import (
    TE_TARGETS,
    UNET_TARGETS,
    assert_same_pixels,
    diffusers_file,
    kohya_mixed,
    make_lora,
    new_store,
    resolved_row,
    to_kohya,
)

STD = 0.15
ROWS = 3  # rows per test draw, with different seeds


def conv_lora(unet) -> dict:
    """A LoRA on one ResNet convolution (LoCon), which eager and compile apply and onnx and tensorrt refuse."""
    layer = unet.down_blocks[0].resnets[0].conv1
    g = torch.Generator().manual_seed(14)
    return {"down_blocks.0.resnets.0.conv1.lora_A.weight": torch.randn(4, layer.in_channels, 3, 3, generator=g) * STD,
            "down_blocks.0.resnets.0.conv1.lora_B.weight": torch.randn(layer.out_channels, 4, 1, 1, generator=g) * STD}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loras")
    shape = build_preset("tiny")
    a, b = make_lora(shape.unet, UNET_TARGETS, seed=11, std=STD), make_lora(shape.unet, UNET_TARGETS, seed=12, std=STD)
    te = make_lora(shape.text_encoder, TE_TARGETS, seed=13, std=0.1)
    return new_store({
        "A.safetensors": diffusers_file(tmp, a),
        "B.safetensors": diffusers_file(tmp, b, te),  # UNet and text encoder
        "A_kohya_half.safetensors": save(to_kohya(a, alpha=2)),  # alpha / rank = 0.5
        "conv.safetensors": diffusers_file(tmp, conv_lora(shape.unet)),
    })


@pytest.fixture(scope="module", autouse=True)
def export_cache(tmp_path_factory):
    """Exports go to a folder of this module's own (the suite never touches ~/.cache)."""
    old = os.environ.get("SDFLEET_CACHE")
    os.environ["SDFLEET_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        del os.environ["SDFLEET_CACHE"]
    else:
        os.environ["SDFLEET_CACHE"] = old


def images(backend, adapters=(), **fields) -> np.ndarray:
    row = {**resolved_row(backend.store, adapters), **fields}
    backend.activate(row["adapters"])
    return draw(backend.pipe, [{**row, "id": f"r{i}", "seed": 100 + i} for i in range(ROWS)])


def unet_out(backend) -> torch.Tensor:
    """One UNet call on fixed inputs: the latent side of "matches eager". Called as the pipeline calls it, with
    the shapes `images` draws (guidance doubles the batch), so a compiled UNet uses the graph it already
    built: another batch size or `return_dict` compiled it again (40 s of the suite)."""
    g = torch.Generator().manual_seed(0)
    batch = 2 * ROWS
    sample, context = torch.randn(batch, 4, 32, 32, generator=g), torch.randn(batch, 77, 64, generator=g)
    with torch.no_grad():
        return backend.pipe.unet(sample, torch.tensor(500), encoder_hidden_states=context, timestep_cond=None,
                                 cross_attention_kwargs=None, added_cond_kwargs=None, return_dict=False)[0]


@pytest.fixture(scope="module")
def eager(store):
    return make_backend("eager", build_preset("tiny"), store)


@pytest.fixture(scope="module")
def reference(eager):
    """Eager's images for each adapter set the backends are checked on."""
    sets = {"base": (), "A": (("A", 1.0),), "B": (("B", 1.0),), "blend": (("A", 0.7), ("B", 0.5)),
            "conv": (("conv", 1.0),)}
    return {name: images(eager, adapters) for name, adapters in sets.items()}, sets


# -- the weight mapping every fused backend shares ----------------------------------------------------------

def test_lora_layers_read_every_spelling_with_alpha_folded_in(store):
    pipe = build_preset("tiny")
    diffusers_a = lora_layers(pipe, store.load_state_dict(store.resolve("A")))
    kohya_half = lora_layers(pipe, store.load_state_dict(store.resolve("A_kohya_half")))
    assert set(diffusers_a) == set(kohya_half) and len(diffusers_a) == 7 * 2 * 4  # 7 blocks, 2 attentions, q/k/v/out
    for name, (a, b) in diffusers_a.items():
        assert name.startswith("unet.") and name.removeprefix("unet.") in dict(pipe.unet.named_modules())
        torch.testing.assert_close(delta(*kohya_half[name]), 0.5 * delta(a, b))
    both = lora_layers(pipe, store.load_state_dict(store.resolve("B")))
    text = [n for n in both if n.startswith("text_encoder.")]
    assert len(text) == 4 * 2 and all(n.removeprefix("text_encoder.") in dict(pipe.text_encoder.named_modules())
                                      for n in text)


def test_lora_layers_scale_every_kohya_layer_by_its_own_alpha():
    """kohya keys the alphas of layers outside attention (proj_in, ff, convs) by the module, not by the down
    matrix: those were read as alpha = rank, so compile, onnx and tensorrt drew such LoRAs at the wrong strength."""
    pipe = build_preset("tiny")
    state, expected = kohya_mixed(pipe.unet)
    layers = lora_layers(pipe, state)
    assert set(layers) == set(expected)
    for name, update in expected.items():
        torch.testing.assert_close(delta(*layers[name]), update, msg=name)


def test_switch_updates_restore_what_only_the_old_set_touched_exactly():
    g = torch.Generator().manual_seed(0)
    base = {f"l{i}": torch.randn(6, 5, generator=g) for i in range(4)}

    def lora(*names):
        return {n: (torch.randn(2, 5, generator=g), torch.randn(6, 2, generator=g)) for n in names}

    a, b = lora("l0", "l1"), lora("l1", "l2")
    weights = dict(base)
    history = []
    for step in ([(a, 1.0)], [(b, 0.5)], [], [(a, 1.0), (b, 0.5)], [(a, 1.0)]):
        old = history[-1] if history else []
        updates = switch_updates(base, old, step)
        weights.update(updates)
        history.append(step)
        # the union: every layer either set touches is written, others are left alone
        assert set(updates) == {n for s in (old, step) for layers, _ in s for n in layers}
    # after A -> B -> none -> A+B -> A the weights are exactly those of A alone, bit for bit
    fresh = dict(base)
    fresh.update(switch_updates(base, [], [(a, 1.0)]))
    for name in base:
        assert torch.equal(weights[name], fresh[name]), name
    assert torch.equal(weights["l2"], base["l2"]) and torch.equal(weights["l3"], base["l3"])
    torch.testing.assert_close(weights["l0"], base["l0"] + a["l0"][1] @ a["l0"][0])
    # writing only the new set's layers would have left B in l2: the trap the union avoids
    with pytest.raises(LoraMapError, match="l9"):
        switch_updates(base, [], [(lora("l9"), 1.0)])


# -- choosing a backend -------------------------------------------------------------------------------------

@pytest.mark.parametrize("rows", [1, 2, 63, 64, 65, 130])
@pytest.mark.parametrize("most", [None, 16])
def test_graphs_run_in_chunks_they_take_and_every_row_lands_in_place(rows, most):
    """Exported graphs take 2..63 rows (a TensorRT engine up to its profile's end, `most`): bigger batches
    split, a single row is doubled and cut back."""
    from actors.backends.export import MAX_BATCH, run_in_chunks

    x = torch.arange(rows * 3, dtype=torch.float32).reshape(rows, 3)
    sizes = []

    def run(chunk, target):
        assert chunk["x"].shape[0] == target.shape[0]
        sizes.append(target.shape[0])
        target.copy_(chunk["x"] * 2)
        return target

    limit = most or MAX_BATCH
    out = run_in_chunks({"x": x}, torch.empty_like(x), run, **({"most": most} if most else {}))
    assert torch.equal(out, x * 2)
    assert all(2 <= n <= limit for n in sizes) and sum(sizes) == rows + (rows % limit == 1)


def test_compile_copies_the_unet_output_out_of_cuda_graph_memory():
    """The hook the compile backend adds when CUDA graphs are on: the UNet's output (either form) becomes a
    copy, the same values in storage of its own, so the next call cannot overwrite what a scheduler kept."""
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    from actors.backends.compile import CompileBackend

    graph_memory = torch.randn(2, 4, 8, 8)
    for output in (UNet2DConditionOutput(sample=graph_memory), (graph_memory,)):
        copied = CompileBackend._copy_out(None, None, output)[0]
        assert torch.equal(copied, graph_memory) and copied.data_ptr() != graph_memory.data_ptr()
    output = CompileBackend._copy_out(None, None, UNet2DConditionOutput(sample=graph_memory))
    assert output.sample is output["sample"] is output[0], "every view of the output holds the copy"


def test_check_backend_names_what_is_missing(monkeypatch):
    with pytest.raises(BackendError, match="unknown backend 'trt'; backends: eager, compile, onnx, tensorrt"):
        check_backend("trt", "cpu")
    with pytest.raises(BackendError, match="NVIDIA GPU") as info:
        check_backend("tensorrt", "cpu")
    if "tensorrt package" not in str(info.value):
        pytest.fail("tensorrt is installed on a CPU machine?")  # the message names both missing parts here
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "onnxruntime" else real(name))
    with pytest.raises(BackendError, match="needs onnxruntime"):
        check_backend("onnx", "cpu")
    check_backend("eager", "cpu")
    check_backend("compile", "cpu")  # this machine has g++
    check_backend("compile", "cuda")  # and gcc, for Triton
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(BackendError, match="on a GPU needs a C compiler .*for Triton"):
        check_backend("compile", "cuda")


def test_onnx_on_a_gpu_without_onnxruntime_gpu_stops_at_load():
    """The CPU wheel of onnxruntime has no CUDA provider; given one anyway, ONNX Runtime only warns and runs
    on the CPU with CUDA pointers bound to it. The backend refuses at load instead, naming the fix."""
    import types

    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    pipe = types.SimpleNamespace(unet=types.SimpleNamespace(device=torch.device("cuda", 0)))
    with pytest.raises(BackendError, match="needs onnxruntime-gpu .*CPUExecutionProvider.*--backend compile"):
        make_backend("onnx", pipe, None)


def test_an_onnx_session_that_fell_back_to_the_cpu_is_refused_on_a_gpu():
    """onnxruntime-gpu whose CUDA provider fails to start (CUDA or cuDNN libraries of another version) builds
    a CPU session with a warning; bound to CUDA tensors, every row would fail with a data-transfer error."""
    import types

    from actors.backends.onnx import on_the_device

    fell_back = types.SimpleNamespace(get_providers=lambda: ["CPUExecutionProvider"])
    with pytest.raises(BackendError, match="could not start its CUDA provider.*--backend compile"):
        on_the_device(fell_back, "cuda")
    assert on_the_device(fell_back, "cpu") is fell_back
    on_gpu = types.SimpleNamespace(get_providers=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert on_the_device(on_gpu, "cuda") is on_gpu


def test_fused_backends_refuse_layers_they_cannot_change(store):
    backend = make_backend("onnx", build_preset("tiny"), store, fingerprint="refuse")
    with pytest.raises(Exception, match="adapter 'conv'.*cannot change.*--backend eager"):
        backend.activate([{"name": "conv", "scale": 1.0}])
    # 7 transformer blocks (q/k/v/out twice, 2 feed-forward) with proj_in/out, 2 text layers (q/k/v/out, fc1/2)
    assert len(adaptable_layers(backend.pipe)) == 7 * (10 + 2) + 2 * 6


# -- onnx -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def onnx_backend(store):
    return make_backend("onnx", build_preset("tiny"), store, fingerprint="test-tiny")


def test_graph_backends_keep_the_sessions_of_the_most_recently_drawn_sizes_only(monkeypatch):
    """Each size's UNet session (onnx) or engine (tensorrt) holds its own copy of the baked-in weights: an
    actor meeting a catalogue's sizes grew by one per size. Past MAX_SIZES the least recently drawn size
    goes, its UNet's and its decoder's; the text encoder's stays. A size drawn again is read back from the
    export cache, not exported again."""
    import actors.backends.onnx as onnx
    from actors.backends.export import MAX_SIZES, drop_old_sizes, use

    sizes = [(8 * i, 8 * i) for i in range(1, MAX_SIZES + 2)]
    loaded = {("text_encoder", None): "te"}
    for size in sizes[:MAX_SIZES]:
        loaded |= {("unet", size): "u", ("vae", size): "v"}
    assert drop_old_sizes(loaded) == 0
    use(loaded, ("unet", sizes[0]))  # the first size drawn again: now the second is the least recently used
    loaded[("unet", sizes[MAX_SIZES])] = "u"
    assert drop_old_sizes(loaded) == 2 and {size for _, size in loaded} == {None, sizes[0], *sizes[2:]}

    backend = make_backend("onnx", build_preset("tiny"), None, fingerprint="test-sizes")  # its own cache entries
    monkeypatch.setattr(onnx, "export_component", lambda pipe, component, path, size: path.write_bytes(b"onnx"))
    monkeypatch.setattr(backend.ort, "InferenceSession", lambda path, options, providers: object())
    for size in [*sizes, sizes[0]]:
        backend.session("unet", size)
    stats = backend.stats()
    assert (stats["exports"], stats["sessions"], stats["sessions_dropped"]) == (MAX_SIZES + 1, MAX_SIZES, 2)


def test_onnx_matches_eager_on_pixels_and_latents(onnx_backend, eager, reference):
    expected, sets = reference
    for name, adapters in sets.items():
        if name != "conv":  # onnx refuses convolution LoRAs (test_fused_backends_refuse_layers_they_cannot_change)
            assert_same_pixels(images(onnx_backend, adapters), expected[name], f"onnx vs eager, {name}")
    eager.activate([])
    onnx_backend.activate([])
    ours, theirs = unet_out(onnx_backend), unet_out(eager)
    assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max(), "UNet outputs differ beyond 1e-4 relative"
    assert not np.array_equal(expected["A"], expected["base"]), "the LoRA must change the image for this to test anything"


def test_onnx_swaps_leave_no_trace(onnx_backend, store):
    fresh = make_backend("onnx", build_preset("tiny"), store, fingerprint="test-tiny")
    a_fresh = images(fresh, [("A", 1.0)])
    assert fresh.exports == 0, "a second backend on the same model reuses the cached export"
    sequence = ([("A", 1.0)], [("B", 1.0)], [("A", 1.0)], [("A", 0.7), ("B", 0.5)], [], [("A", 1.0)])
    a_again = [images(onnx_backend, seq) for seq in sequence]
    assert np.array_equal(a_again[2], a_fresh), "A -> B -> A differs from a fresh session with A"
    assert np.array_equal(a_again[5], a_fresh), "A -> B -> A -> blend -> none -> A differs from a fresh session with A"
    base = images(make_backend("onnx", build_preset("tiny"), store, fingerprint="test-tiny"), [])
    assert np.array_equal(a_again[4], base), "no adapter after A, B and a blend is not the base model"
    assert onnx_backend.stats()["swaps"] >= 5


# -- compile ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compiled(store):
    return make_backend("compile", build_preset("tiny"), store)


def test_compile_matches_eager_and_ten_swaps_never_recompile(compiled, reference):
    from torch._dynamo.utils import counters

    expected, sets = reference
    assert_same_pixels(images(compiled, sets["base"]), expected["base"], "compile vs eager, base")
    assert compiled.compiles >= 1
    compiled.activate([])
    ours, theirs = unet_out(compiled), unet_out(make_backend("eager", build_preset("tiny"), None))
    assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max(), "UNet outputs differ beyond 1e-4 relative"
    graphs = counters["stats"]["unique_graphs"]
    swaps = compiled.swaps
    order = ["A", "B", "blend", "base", "conv", "A", "blend", "B", "base", "A"]  # conv: a LoRA on a convolution
    for name in order:
        assert_same_pixels(images(compiled, sets[name]), expected[name], f"compile vs eager, {name}")
    assert compiled.swaps - swaps == 10
    assert counters["stats"]["unique_graphs"] == graphs, "adapter swaps recompiled"
    assert not any("lora" in name for name, _ in compiled.pipe.unet.named_modules()), "LoRA modules in the graph"


def test_the_compile_backend_lifts_dynamos_recompile_limit_and_counts_functions_that_hit_it():
    """torch's limit of 8 graphs per function was reached by one actor drawing a catalogue's mix of sizes and
    batches (18 shapes on tiny), after which dynamo drew the UNet eagerly, said only in a log line. (torch's
    own `config.patch`: pytest's monkeypatch deletes a torch config entry when it undoes.)"""
    from torch._dynamo import config as dynamo_config

    from actors.backends.compile import RECOMPILE_LIMIT

    with dynamo_config.patch(recompile_limit=8):
        backend = make_backend("compile", build_preset("tiny"), None)  # compiles nothing until it draws
        assert dynamo_config.recompile_limit == RECOMPILE_LIMIT >= 64
        assert backend.stats()["eager_fallbacks"] == 0
        with dynamo_config.patch(recompile_limit=1):
            double = torch.compile(lambda x: x * 2, backend="eager", dynamic=False)
            for n in (1, 2, 3):  # a graph per shape: the second is past the limit of 1, and dynamo gives up on it
                assert torch.equal(double(torch.ones(n)), torch.full((n,), 2.0))
        assert backend.stats()["eager_fallbacks"] == 1


def test_compile_swaps_are_exact_and_keep_each_original_once(compiled, store):
    """A -> B -> blend -> none -> A leaves the weights (and so the images) exactly as a fresh load of A,
    and the originals of touched layers are kept once however many adapters touched them."""
    sequence = [[("A", 1.0)], [("B", 1.0)], [("A", 0.7), ("B", 0.5), ("A_kohya_half", 1.0)], [], [("A", 1.0)]]
    storage = {name: w.data_ptr() for name, w in compiled.loras.targets.items()}
    for adapters in sequence:
        compiled.activate(resolved_row(store, adapters)["adapters"])
    fresh = make_backend("compile", build_preset("tiny"), store)
    fresh.activate(resolved_row(store, [("A", 1.0)])["adapters"])
    for name, weight in compiled.loras.targets.items():
        assert torch.equal(weight, fresh.loras.targets[name]), f"{name} differs from a fresh load of A"
    assert np.array_equal(images(compiled, [("A", 1.0)]), images(fresh, [("A", 1.0)]))
    def touched(*names):
        return {n for a in names for n in lora_layers(compiled.pipe, store.load_state_dict(store.resolve(a)))}

    # one copy per touched layer, not per adapter; layers no adapter touched are not copied (conv: if the
    # test before ran on this backend)
    assert touched("A", "B") <= set(compiled.loras.originals) <= touched("A", "B", "conv")
    assert {name: w.data_ptr() for name, w in compiled.loras.targets.items()} == storage, "weights moved"


def test_fused_qkv_takes_loras_by_their_layer_names(store, reference):
    """With q, k and v fused into one projection, a LoRA on to_q/to_k/to_v writes into the fused weight."""
    from actors.backends.compile import CompileBackend, CompileSettings

    expected, sets = reference
    backend = CompileBackend(build_preset("tiny"), store, settings=CompileSettings(fuse_qkv=True, compile_vae=False))
    attention = backend.pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1
    assert attention.to_k.weight.data_ptr() == attention.to_qkv.weight[attention.to_q.weight.shape[0]:].data_ptr()
    for name in ("A", "blend", "base"):
        assert_same_pixels(images(backend, sets[name]), expected[name], f"fused qkv vs eager, {name}")


COMPILE_TOY = """
import sys, torch
from torch._dynamo.utils import counters
from actors.backends.compile import CompileCache
cache = CompileCache(sys.argv[1], "toy")
cache.load()
if sys.argv[2] == "layers":
    model = torch.compile(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)),
                          dynamic=False)
else:  # one graph for a range of sizes: another range is a second graph under the same torch key
    model = torch.compile(lambda x: x.sum(0), dynamic=True)
with torch.no_grad():
    for rows in map(int, sys.argv[3].split(",")):  # a graph each, saved after each call as the backend does
        model(torch.randn(rows, 8))
        cache.save()
print(cache.loaded, cache.saved, counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"])
"""


def test_compiled_graphs_kept_in_the_backend_cache_make_another_machine_start_warm(tmp_path):
    """A process with an empty local torch cache (another node, a new pod) loads what the first one compiled
    from the backend cache and compiles nothing; having compiled nothing, it writes nothing back. Each save
    holds only what was new: torch's saver repeated everything saved before in every file. A node whose own
    torch cache is already warm still fills an empty backend cache (it wrote nothing there: backends QA), and a
    graph for sizes the stored one's guards exclude is kept, though torch files it under the same key (review)."""
    import subprocess
    import sys

    from helpers import REPO

    def on_a_machine(name: str, store: str = "store", toy: str = "layers", sizes: str = "3,5") -> list[int]:
        env = {**os.environ, "PYTHONPATH": str(REPO), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / name)}
        proc = subprocess.run([sys.executable, "-c", COMPILE_TOY, str(tmp_path / store), toy, sizes], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return [int(n) for n in proc.stdout.split()]

    assert on_a_machine("a") == [0, 2, 0, 2]  # loaded, saved, graphs from the caches, graphs compiled
    assert on_a_machine("b") == [2, 0, 2, 0]
    first, second = sorted((p.stat().st_mtime_ns, p.stat().st_size) for p in
                           (tmp_path / "store" / "torch-compile" / "toy").iterdir())
    assert second[1] < 1.5 * first[1], (first, second)  # one graph each, not the first again in the second
    # node a again, warm, with a store that is empty: its graphs come from its own cache and go to the store
    assert on_a_machine("a", store="emptied") == [0, 2, 2, 0]
    assert on_a_machine("c", store="emptied") == [2, 0, 2, 0]  # so a third node starts warm from it
    # sizes 16 and then 8192 (past the first graph's guard): the second graph reaches the store too
    assert on_a_machine("d", store="guarded", toy="sum", sizes="16") == [0, 1, 0, 1]
    assert on_a_machine("e", store="guarded", toy="sum", sizes="16,8192") == [1, 1, 1, 1]
    assert on_a_machine("f", store="guarded", toy="sum", sizes="16,8192") == [2, 0, 2, 0]


def test_in_place_loras_refuse_a_layer_they_cannot_write_and_leave_the_weights():
    weights = {"l0": torch.ones(3, 2)}
    loras = InPlaceLoras(weights)
    with pytest.raises(LoraMapError, match="l9 is not a layer this backend can adapt"):
        loras.switch([({"l9": (torch.ones(1, 2), torch.ones(3, 1))}, 1.0)])
    assert torch.equal(weights["l0"], torch.ones(3, 2)) and loras.active == []


@pytest.mark.gpu
def test_compile_on_a_gpu_with_cuda_graphs_fused_qkv_and_channels_last_matches_eager(store):
    """The GPU defaults (reduce-overhead, i.e. CUDA graphs; fused QKV; channels-last) in fp16: eager's images
    within fp16 noise, with and without a LoRA, and no recompile or re-capture over swaps."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from torch._dynamo.utils import counters

    def on_gpu():
        return build_preset("tiny").to("cuda", torch.float16)

    eager, compiled = make_backend("eager", on_gpu(), store), make_backend("compile", on_gpu(), store)
    assert compiled.settings.mode == "reduce-overhead" and compiled.settings.fuse_qkv
    sets = ((), (("A", 1.0),), (("A", 0.7), ("B", 0.5)), (("conv", 1.0),))
    for adapters in sets:
        diff = np.abs(images(compiled, adapters).astype(int) - images(eager, adapters))
        assert diff.mean() < 2.0, f"compile vs eager {adapters}: mean difference {diff.mean():.2f}/255"
    graphs = counters["stats"]["unique_graphs"]
    for adapters in sets * 3:
        images(compiled, adapters)
    assert counters["stats"]["unique_graphs"] == graphs, "swaps recompiled"
    assert not counters["inductor"]["cudagraph_skips"], "CUDA graphs were skipped: the mode ran without them"
    # Without guidance the scheduler keeps the UNet's raw outputs (PNDM, for later steps): they must not be
    # the CUDA graph's memory, which the next step overwrites.
    raw = dict(scheduler="pndm", guidance_scale=1.0, steps=4)
    diff = np.abs(images(compiled, (), **raw).astype(int) - images(eager, (), **raw))
    assert diff.mean() < 2.0, f"compile vs eager, pndm without guidance: mean difference {diff.mean():.2f}/255"


# -- the real architecture ------------------------------------------------------------------------------

@pytest.mark.slow
def test_sd21_random_exports_to_onnx_and_matches_eager(tmp_path, monkeypatch):
    """SD 2.1's architecture (random weights) through the onnx backend at 64 px: the export path of the
    real model, not only tiny's. Prints the export time and the process's peak memory."""
    import resource
    import time

    monkeypatch.setenv("SDFLEET_CACHE", str(tmp_path))
    row = {**resolved_row(new_store({}), ()), "width": 64, "height": 64, "steps": 2}
    eager = draw(build_preset("sd21-random"), [row])
    started = time.perf_counter()
    backend = make_backend("onnx", build_preset("sd21-random"), None, fingerprint="sd21-random-test")
    ours = draw(backend.pipe, [row])
    seconds = time.perf_counter() - started
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    on_disk = sum(f.stat().st_size for f in tmp_path.rglob("*") if f.is_file()) / 1024**3
    print(f"\nsd21-random onnx export + first draw at 64 px: {seconds:.0f} s, peak RSS {peak_gb:.1f} GB, "
          f"{on_disk:.1f} GB exported")
    assert backend.exports == 3
    assert_same_pixels(ours, eager, "sd21-random onnx vs eager")


# -- tensorrt (NVIDIA GPUs only) -----------------------------------------------------------------------

@pytest.mark.gpu
def test_tensorrt_matches_eager_and_refits_without_residue(store, tmp_path, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("tensorrt", reason="needs the tensorrt package (pip install '.[tensorrt]')")
    monkeypatch.setenv("SDFLEET_CACHE", str(tmp_path))

    def on_gpu():
        return build_preset("tiny").to("cuda", torch.float16)

    eager, trt_backend = make_backend("eager", on_gpu(), store), make_backend("tensorrt", on_gpu(), store)
    for adapters in ((), (("A", 1.0),), (("A", 0.7), ("B", 0.5))):
        # fp16 on two engines: a looser bound than the CPU backends' 3/255
        diff = np.abs(images(trt_backend, adapters).astype(int) - images(eager, adapters))
        assert diff.mean() < 2.0, f"tensorrt vs eager {adapters}: mean difference {diff.mean():.2f}/255"
    fresh = make_backend("tensorrt", on_gpu(), store)
    a_fresh = images(fresh, [("A", 1.0)])
    assert fresh.builds == 0, "a second backend on the same model reuses the cached engines"
    sequence = [images(trt_backend, seq) for seq in ([("B", 1.0)], [("A", 1.0)], [], [("A", 1.0)])]
    assert np.array_equal(sequence[1], a_fresh) and np.array_equal(sequence[3], a_fresh), "refit left residue"
    assert trt_backend.refits >= 4


def test_a_damaged_export_cache_entry_is_exported_again_not_used(tmp_path, monkeypatch):
    """A bit-flipped model.onnx.data was loaded as it was: wrong pixels, rows `ok`, and reruns skip them; one cut
    short failed every row of every run until someone deleted the folder (and, from a bucket, the local copy's
    deletion only fetched the same bad object again). Each entry carries its files' digests, checked on use."""
    import shutil

    import fsspec

    from actors.backends.export import ExportCache

    monkeypatch.setenv("SDFLEET_CACHE", str(tmp_path / "node"))
    builds = []

    def build(path):
        builds.append(path)
        path.write_bytes(b"graph")
        (path.parent / "model.onnx.data").write_bytes(bytes(range(256)) * 64)

    for uri in (str(tmp_path / "shared"), "memory://qa-bcache/o"):
        builds.clear()
        model = ExportCache(uri).get("k1", build)
        assert len(builds) == 1 and model.read_bytes() == b"graph"
        assert model.parent.stat().st_mode & 0o755 == 0o755  # readable by others sharing the volume (was 0700)
        assert ExportCache(uri).get("k1", build) == model and len(builds) == 1  # whole: used as it is
        data = model.parent / "model.onnx.data"
        for damage in (lambda b: b[:100] + bytes([b[100] ^ 0xFF]) + b[101:], lambda b: b[: len(b) // 2]):
            if uri.startswith("memory://"):  # the bucket's copy damaged, and this node's copy gone
                fs = fsspec.filesystem("memory")
                fs.pipe_file("/qa-bcache/o/onnx/k1/model.onnx.data", damage(fs.cat_file(
                    "/qa-bcache/o/onnx/k1/model.onnx.data")))
                shutil.rmtree(model.parent)
            else:
                data.write_bytes(damage(data.read_bytes()))
            before = len(builds)
            assert ExportCache(uri).get("k1", build).read_bytes() == b"graph"
            assert len(builds) == before + 1, "a damaged entry was used"
            assert data.read_bytes() == bytes(range(256)) * 64
            if uri.startswith("memory://"):  # and the bucket holds the good one again
                assert fsspec.filesystem("memory").cat_file("/qa-bcache/o/onnx/k1/model.onnx.data") == data.read_bytes()


def test_an_export_killed_midway_leaves_no_staging_folder_for_good(tmp_path, monkeypatch):
    """An actor killed while it exported (SIGKILL, an OOM, a pod gone: no `finally`) left its staging folder in
    the cache for good: at SD 2.1 size gigabytes a kill (backends QA). The next cache removes a folder whose
    builder's lock is free; one being built now stays, whatever its process id says (a pod sharing the volume
    and the node's hostname has PIDs of its own: review), and so does a lockless one until it is a day old."""
    import subprocess
    import sys
    import time

    from actors.backends.export import ExportCache, staging_folder
    from helpers import REPO

    monkeypatch.setenv("SDFLEET_CACHE", str(tmp_path / "node"))
    cache = tmp_path / "shared"
    killed = subprocess.run([sys.executable, "-c", """
import os, sys
from actors.backends.export import ExportCache

def build(path):
    path.write_bytes(b"half a graph")
    os._exit(9)  # killed while exporting: nothing after this runs

ExportCache(sys.argv[1]).get("k1", build)
""", str(cache)], env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)
    assert killed.returncode == 9, killed.stderr[-2000:]
    left = sorted(p.name for p in (cache / "onnx").iterdir())
    assert len(left) == 2 and left[1] == left[0] + ".lock", left  # the folder, and its (now free) lock
    assert (cache / "onnx" / left[0] / "model.onnx").exists()
    old, young = cache / "onnx" / ".k3-oldstyle", cache / "onnx" / ".k4-oldstyle"  # (lockless, as before)
    for folder in (old, young):
        folder.mkdir()
    os.utime(old, (time.time() - 2 * 86400,) * 2)

    def build(path):
        path.write_bytes(b"graph")

    with staging_folder(cache / "onnx", "k9") as building:  # another actor's export, going on now
        assert ExportCache(str(cache)).get("k2", build).read_bytes() == b"graph"
        assert sorted(p.name for p in (cache / "onnx").iterdir()) == sorted(
            ["k2", young.name, building.name, building.name + ".lock"])
    assert sorted(p.name for p in (cache / "onnx").iterdir()) == sorted(["k2", young.name])  # its own goes too
