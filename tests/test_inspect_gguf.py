"""inspect's GGUF projections come from the exporter's own type choice: they equal the bytes of the file it writes."""
from __future__ import annotations

import pytest
from gguf import GGUFReader

from v4convert.export.gguf.exporter import GGUFType, TypeMix, export_gguf
from v4convert.inspect import build_report

from tests.test_gguf_export import synth_config, v32_llama_config

CASES = [("gguf-mxfp4-moe", TypeMix()), ("gguf-q8_0", TypeMix(GGUFType.Q8_0, GGUFType.Q8_0))]


@pytest.fixture(scope="module")
def gguf_sources(tiny_ckpts, tmp_path_factory) -> dict:
    """The tiny presets GGUF export accepts; V3.2 with an indexer head of 64 (export.gguf.constraints: the
    preset's 32 is refused, llama.cpp's deepseek32 cannot load it)."""
    v32 = synth_config(v32_llama_config(), tmp_path_factory.mktemp("inspect_gguf") / "v32")
    return {"v3-tiny": tiny_ckpts["v3-tiny"], "v32-tiny": v32, "v4-flash-tiny": tiny_ckpts["v4-flash-tiny"]}


@pytest.mark.parametrize("preset", ["v3-tiny", "v32-tiny", "v4-flash-tiny"])
@pytest.mark.parametrize("key,mix", CASES, ids=[k for k, _ in CASES])
def test_gguf_projection_equals_exported_tensor_bytes(gguf_sources, tmp_path, preset, key, mix) -> None:
    src = gguf_sources[preset]
    out = tmp_path / "m.gguf"
    r = export_gguf(src, out, mix, modelfile=False)
    reader = GGUFReader(out)
    written = sum(int(t.n_bytes) for t in reader.tensors)
    assert written == r.n_bytes
    assert build_report(src)["projections"][key]["bytes"] == written


def test_indexer_weights_proj_projects_as_exported(gguf_sources, tmp_path) -> None:
    """The drift issue #10 found: the V3.2 indexer's weights_proj was projected Q8_0 while the file has F32."""
    from v4convert.checkpoint import Checkpoint
    from v4convert.export.gguf.exporter import ARCH_OF, gguf_types
    from v4convert.families.roles import Role
    with Checkpoint.open(gguf_sources["v32-tiny"]) as ck:
        infos = [i for i in ck.infos() if i.role is Role.INDEXER_WEIGHTS]
        assert infos
        types = {q.name for i in infos for _, q in gguf_types(ck.arch, ARCH_OF[ck.family], i.role, i.name, i.shape,
                                                               TypeMix())}
    out = tmp_path / "m.gguf"
    export_gguf(gguf_sources["v32-tiny"], out, TypeMix(), modelfile=False)
    in_file = {t.tensor_type.name for t in GGUFReader(out).tensors if t.name.endswith(".indexer.proj.weight")}
    assert types == in_file == {"F32"}
    # and inspect's projection counts it as F32: 4 bytes per value
    from v4convert.inspect import PROJECTIONS
    from v4convert.families.layout import inventory
    slots = [s for s in inventory(ck.arch) if s.role is Role.INDEXER_WEIGHTS]
    fn = PROJECTIONS["gguf-mxfp4-moe"][1]
    assert [fn(ck.arch, s) for s in slots] == [4 * s.numel for s in slots]
