"""Deltas of sharded (FSDP2) and DDP-wrapped models on two CPU processes (gloo), one spawn for all:
`surgery.delta` gathers the full tensors on every rank (the single-process Delta, the unsharded
base's fingerprint); `apply` puts each rank's rows into its shards (hot-swap, fresh injection), a
delta for another base is refused on every rank; `merge` / `unmerge` are exact per shard and the
merged sharded model computes what the unsharded merged one does; `remove` leaves every shard bit
for bit; `hub.push` / `save_peft` gather, write once (rank 0, or `rank=`) and give every rank the
same result, and a push called on one rank only raises instead of hanging; DDP wrappers work as
their `.module`."""

from __future__ import annotations

import copy
import json
import os
import socket
from datetime import timedelta

import pytest
import torch
from models import tiny_llama

import surgery
from surgery import distributed

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fill(model, name: str, seed: int) -> None:
    """Give a delta's tensors non-zero values, the same on every rank."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for ad in surgery.engine.adapters(model, name).values():
            for t in ad.tensors().values():
                t.copy_(torch.randn(t.shape, generator=g) * 0.1 + (1.0 if t.dim() == 1 else 0.0))


def _base_local(model) -> dict[str, torch.Tensor]:
    """Every base parameter's local shard (the whole tensor where it is not sharded), cloned."""
    distributed.reshard(model)  # after a forward the root holds its unsharded copies
    return {
        k: distributed.local_tensor(p).detach().clone()
        for k, p in model.named_parameters()
        if not surgery.engine.is_adapter_path(model, k)
    }


def _same_on_ranks(obj) -> None:
    got = _gather(obj)
    assert all(g == got[0] for g in got), got


def _gather(obj):
    import torch.distributed as dist

    out = [None] * WORLD
    dist.all_gather_object(out, obj)
    return out


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _check_fsdp(rank: int, folder: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    import registry
    from registry.peft_format import save_peft

    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(5))
    plain = tiny_llama()
    orig = {k: v.clone() for k, v in plain.state_dict().items()}
    surgery.inject(plain, "lora", targets="@linear", r=4, name="a")
    surgery.inject(plain, "ia3", targets="@mlp", name="b")  # merges as row and column scales
    surgery.inject(plain, "dora", targets="q_proj", r=2, name="c")  # its merge reads the base weight
    surgery.inject(plain, "bitfit", name="e")  # merges within its own tensors: refused when sharded
    for seed, name in enumerate("abce"):
        _fill(plain, name, seed)
    m = copy.deepcopy(plain)
    for layer in m.model.layers:
        fully_shard(layer)
    fully_shard(m)
    assert type(m).__name__ == "FSDPLlamaForCausalLM"
    q = m.model.layers[0].self_attn.q_proj.weight
    assert distributed.is_dtensor(q) and distributed.local_tensor(q).shape[0] == q.shape[0] // 2

    # 1. the fingerprint is the unsharded base's (a fresh sharded base too, with weights)
    assert surgery.fingerprint(m) == surgery.fingerprint(plain)
    bare = tiny_llama()
    for layer in bare.model.layers:
        fully_shard(layer)
    fully_shard(bare)
    assert surgery.fingerprint(bare) == surgery.fingerprint(tiny_llama())
    assert surgery.fingerprint(bare, weights=True) == surgery.fingerprint(tiny_llama(), weights=True)
    # injecting after fully_shard: the new tensors would be plain and never reduced; refused, nothing added
    with pytest.raises(surgery.InjectionError, match="Inject first, then call fully_shard"):
        surgery.inject(bare, "lora", targets="@linear", r=4, name="late")
    assert surgery.names(bare) == []

    # 1. delta: the full tensors, plain, on every rank, equal to the single-process Delta
    _logits(m, ids)  # a forward leaves the root unsharded: delta reads the shards anyway
    for name in "abce":
        d, want = surgery.delta(m, name), surgery.delta(plain, name)
        assert d.base == want.base and d.tensors.keys() == want.tensors.keys()
        for k, t in d.tensors.items():
            assert type(t) is torch.Tensor and t.shape == want.tensors[k].shape and torch.equal(t, want.tensors[k]), k
    torch.testing.assert_close(_logits(m, ids), _logits(plain, ids), rtol=0, atol=1e-5)
    before = _base_local(m)
    if rank == 0:  # inspections, on one rank: no collective (mergeable reads meta tensors of the full shapes)
        assert all(surgery.engine.mergeable(m, n) is True for n in "abc")
        assert "unsharded copy" in str(surgery.engine.mergeable(m, "e"))
        assert "lora" in str(surgery.summary(m))
    dist.barrier()

    # 4. merge / unmerge exact per shard; the merged model computes the unsharded merged one's outputs
    for name in "abc":
        surgery.merge(m, name)
        surgery.merge(plain, name)
    assert sorted(surgery.merged(m)) == ["a", "b", "c"]
    with pytest.raises(surgery.MergeError, match="unsharded copy"):
        surgery.merge(m, "e")
    torch.testing.assert_close(_logits(m, ids), _logits(plain, ids), rtol=0, atol=1e-5)
    w = distributed.full_tensor(m.model.layers[1].mlp.down_proj.weight)
    torch.testing.assert_close(w, plain.model.layers[1].mlp.down_proj.weight, rtol=0, atol=1e-6)
    assert not torch.equal(
        distributed.local_tensor(m.model.layers[0].self_attn.q_proj.weight),
        before["model.layers.0.self_attn.q_proj.weight"],
    )
    sd = surgery.base_state_dict(m)  # the base before the merge, as shards
    for k, v in before.items():
        assert torch.equal(distributed.local_tensor(sd[k]), v), k
    surgery.unmerge(m)
    surgery.unmerge(plain)
    assert surgery.merged(m) == []
    for k, v in _base_local(m).items():
        assert torch.equal(v, before[k]), k
    torch.testing.assert_close(_logits(m, ids), _logits(plain, ids), rtol=0, atol=1e-5)

    # 2. apply: hot-swap (also into a merged delta), a fresh injection, a delta of another base
    new = surgery.delta(plain, "a")
    g = torch.Generator().manual_seed(9)
    new.tensors = {k: torch.randn(t.shape, generator=g) * 0.1 for k, t in new.tensors.items()}
    surgery.apply(m, new)
    surgery.apply(plain, new)
    for k, t in surgery.delta(m, "a").tensors.items():
        assert torch.equal(t, new.tensors[k]), k
    torch.testing.assert_close(_logits(m, ids), _logits(plain, ids), rtol=0, atol=1e-5)
    surgery.merge(m, "a")
    surgery.merge(plain, "a")
    new2 = copy.deepcopy(new)
    new2.tensors = {k: t * 2 for k, t in new.tensors.items()}
    surgery.apply(m, new2)
    surgery.apply(plain, new2)
    assert surgery.merged(m) == ["a"]
    torch.testing.assert_close(_logits(m, ids), _logits(plain, ids), rtol=0, atol=1e-5)
    surgery.unmerge(m, "a")
    surgery.unmerge(plain, "a")
    for k, v in _base_local(m).items():
        assert torch.equal(v, before[k]), k
    fresh = copy.deepcopy(new)
    fresh.tensors = {k: t * -1 for k, t in new.tensors.items()}
    surgery.apply(m, fresh, "fresh")
    surgery.apply(plain, fresh, "fresh")
    torch.testing.assert_close(_logits(m, ids), _logits(plain, ids), rtol=0, atol=1e-5)
    for k, t in surgery.delta(m, "fresh").tensors.items():
        assert torch.equal(t, fresh.tensors[k])
    surgery.merge(m, "fresh")
    surgery.merge(plain, "fresh")
    torch.testing.assert_close(_logits(m, ids), _logits(plain, ids), rtol=0, atol=1e-5)
    surgery.remove(m, "fresh")
    surgery.remove(plain, "fresh")
    other = copy.deepcopy(new)
    other.base = "arch:0123456789abcdef"
    distributed.reshard(m)
    adapters_before = {k: distributed.local_tensor(t).clone() for k, t in m.state_dict().items()}
    with pytest.raises(surgery.DeltaMismatchError, match="trained on base"):
        surgery.apply(m, other)
    with pytest.raises(surgery.DeltaMismatchError, match="trained on base"):
        surgery.apply(m, other, "other")
    assert surgery.names(m) == ["a", "b", "c", "e"]
    for k, t in m.state_dict().items():
        assert torch.equal(distributed.local_tensor(t), adapters_before[k]), k

    # 3. push and save_peft: gathered, written once, the same Ref / path on every rank
    hub = registry.Hub(os.path.join(folder, "hub"))
    ref = hub.push(m, "acme/sharded", adapter="a", alias="prod")
    _same_on_ranks([ref.name, ref.version, ref.digest])
    assert [r.version for r in hub.versions("acme/sharded")] == [1]
    ref2 = hub.push(m, "acme/sharded", adapter="b", rank=1)
    _same_on_ranks([ref2.version, ref2.digest])
    assert [r.version for r in hub.versions("acme/sharded")] == [1, 2]
    pulled = hub.pull(ref)
    assert all(type(t) is torch.Tensor and t.numel() for t in pulled.tensors.values())
    unsharded = tiny_llama()
    surgery.apply(unsharded, pulled)
    surgery.apply(unsharded, hub.pull(ref2))
    for name in "ce":
        surgery.apply(unsharded, surgery.delta(m, name))
    torch.testing.assert_close(_logits(unsharded, ids), _logits(m, ids), rtol=0, atol=1e-5)
    out = save_peft(m, os.path.join(folder, f"peft-{rank}"), adapter="a")
    _same_on_ranks(str(out))
    assert str(out).endswith("peft-0") and not os.path.exists(os.path.join(folder, "peft-1"))
    dist.barrier()
    from safetensors.torch import load_file

    peft = load_file(os.path.join(out, "adapter_model.safetensors"))
    assert peft and all(t.numel() for t in peft.values())
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4

    # bad input: ranks that run different verbs (or deltas) raise on every rank, nothing written
    with pytest.raises(distributed.CollectiveError, match="ranks disagree"):
        surgery.delta(m, "a" if rank == 0 else "b")
    with pytest.raises(distributed.CollectiveError, match="ranks disagree"):
        hub.push(m, "acme/sharded", adapter="a" if rank == 0 else "b")
    assert [r.version for r in hub.versions("acme/sharded")] == [1, 2]

    # 4. remove leaves every shard of the base bit for bit (with a delta merged at the time)
    surgery.merge(m, "a")
    surgery.remove(m)
    assert surgery.names(m) == []
    distributed.reshard(m)
    assert all(p.requires_grad for p in m.parameters())  # the sharded base is trainable again, as before
    for k, p in m.named_parameters():
        rows = distributed.local_rows(p)
        assert rows is not None and torch.equal(distributed.local_tensor(p), orig[k][rows[0] : rows[1]]), k


def _check_mixed_precision() -> None:
    """Under a bf16 all-gather policy a forward leaves the root's unsharded bf16 copies registered
    (lm_head and its adapters): delta and merge read and write the fp32 shards all the same."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(6))
    model = tiny_llama()
    surgery.inject(model, "lora", targets="lm_head", r=4, name="h")
    surgery.inject(model, "lora", targets="q_proj", r=4, name="q")
    _fill(model, "h", 11)
    _fill(model, "q", 12)
    want = {n: surgery.delta(model, n) for n in "hq"}
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    head = model.lm_head.weight
    _logits(model, ids)
    assert model.lm_head.weight is not head and model.lm_head.weight.dtype == torch.bfloat16  # unsharded copy
    for n in "hq":
        for k, t in surgery.delta(model, n).tensors.items():
            assert t.dtype == torch.float32 and torch.equal(t, want[n].tensors[k]), k
    before = _base_local(model)
    surgery.merge(model, "h")
    _logits(model, ids)
    surgery.unmerge(model, "h")
    for k, v in _base_local(model).items():
        assert v.dtype == torch.float32 and torch.equal(v, before[k]), k


def _check_ddp(rank: int, folder: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    import registry

    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(5))
    model = tiny_llama()
    surgery.inject(model, "lora", targets="@linear", r=4, name="a")
    _fill(model, "a", 3)
    ddp = DDP(model)
    want = surgery.delta(model, "a")
    for obj in (ddp, ddp.module):
        d = surgery.delta(obj, "a")
        assert d.base == surgery.fingerprint(tiny_llama()) == surgery.fingerprint(ddp)
        assert all(torch.equal(t, want.tensors[k]) for k, t in d.tensors.items())
    orig = {k: v.clone() for k, v in surgery.base_state_dict(ddp).items()}
    y = _logits(ddp, ids)
    surgery.merge(ddp, "a")
    assert surgery.merged(ddp) == surgery.merged(model) == ["a"]
    torch.testing.assert_close(_logits(ddp, ids), y, rtol=0, atol=1e-5)
    surgery.unmerge(ddp.module, "a")
    assert all(torch.equal(v, orig[k]) for k, v in surgery.base_state_dict(model).items())
    hub = registry.Hub(os.path.join(folder, "hub-ddp"))
    ref = hub.push(ddp, "acme/ddp", adapter="a")  # collective: one version
    ref2 = hub.push(ddp.module, "acme/ddp", adapter="a", rank=0)  # every rank, written once by rank=
    _same_on_ranks([ref.version, ref2.version, ref.digest == ref2.digest])
    assert [r.version for r in hub.versions("acme/ddp")] == [1, 2]
    assert ref.digest != ref2.digest  # a new version, with the same blob
    surgery.remove(ddp)
    assert surgery.names(model) == []


def _check_one_rank_push(rank: int, folder: str) -> None:
    """A delta merged before sharding is refused by unmerge (its record is of the whole weight). A push
    of a sharded model called on rank 0 only raises there after the guard's timeout (the other rank
    never comes); nothing is written. Last: gloo closes the pair on that timeout."""
    import time

    from torch.distributed.fsdp import fully_shard

    import registry

    model = tiny_llama()
    surgery.inject(model, "lora", targets="@linear", r=4, name="a")
    _fill(model, "a", 7)
    surgery.merge(model, "a")  # merged whole, then sharded: no record of a shard to unmerge with
    fully_shard(model)
    with pytest.raises(surgery.MergeError, match="before the model was sharded"):
        surgery.unmerge(model, "a")
    assert surgery.merged(model) == ["a"]
    hub = registry.Hub(os.path.join(folder, "hub-one"))
    distributed.TIMEOUT = timedelta(seconds=1)
    if rank == 0:
        t0 = time.perf_counter()
        with pytest.raises(distributed.CollectiveError, match="every rank must call it"):
            hub.push(model, "acme/one", adapter="a")
        assert time.perf_counter() - t0 < 30
        assert not os.path.exists(os.path.join(folder, "hub-one", "names"))
    else:
        time.sleep(1.5)  # alive but elsewhere: rank 0 times out rather than seeing a closed peer


def _worker(rank: int, port: int, folder: str) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    _check_fsdp(rank, folder)
    _check_mixed_precision()
    _check_ddp(rank, folder)
    dist.barrier()
    _check_one_rank_push(rank, folder)  # leaves the process group unusable (gloo's timeout): no teardown
    os._exit(0)  # gloo's threads can abort the interpreter's teardown on a loaded machine


def test_sharded_and_ddp_deltas(tmp_path):
    import torch.multiprocessing as mp

    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
