"""What the tests share; nothing in the package imports it (tests/test_layout.py).

- processes: ``run_on_ranks`` (a test body on 1, 2 or 4 gloo processes), ``cpu_env``,
  ``run_pretrain`` (``ordmoe-pretrain`` as a user runs it), ``check_pretrain`` (its dry runs and
  refusals, in this process), ``read_metrics``;
- devices: ``on_device``;
- megatron-core's MoE auxiliary-loss tracker: ``moe_aux_loss_values``, ``reset_moe_aux_losses``;
- a tiny GPT-MoE: ``tiny_config``, ``tiny_model`` (MLA: ``multi_latent_attention=True``),
  ``tiny_batch`` / ``tiny_batches``, ``packed_batch``, ``hf_char_tokenizer``,
  ``ordmoe_schedule_step`` (one step of the OrdMoE schedule), ``single_tier_and_plain_training``.

Tests that are CPU by design (gloo processes, bit-for-bit reproducibility on the CPU's kernels)
hide CUDA from their processes (``cpu_env``, ``run_on_ranks``), so they test the same thing on a
GPU machine; single-process model tests run on the process's device (``on_device``).

``run_on_ranks`` always starts fresh processes with the ``spawn`` start method, also for
``world_size == 1``: the caller's process never gets a process group, Megatron global state or
the CPU-emulation device mode, and every world size has the same semantics (``fn``, its
arguments and its return value must be picklable; ``fn`` must be importable, i.e. defined at
module level). Each process starts through the one bootstrap, ``runtime.distributed``.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import queue as queue_lib
import socket
import subprocess
import sys
import time
import traceback
from typing import Any, Callable, Optional

import torch
import torch.multiprocessing as mp
from megatron.core.transformer.moe import moe_utils

from ordmoe_megatron import OrdMoEConfig
from ordmoe_megatron.runtime import bridges, compat
from ordmoe_megatron.runtime.bridges import exit_when_parent_exits
from ordmoe_megatron.runtime.distributed import LOOPBACK, device, find_free_port, init_process_group


# ============================================================================================
# processes
# ============================================================================================
def cpu_env(**extra):
    """The environment of a CPU-by-design subprocess: no CUDA device, and this interpreter's
    console scripts (``ordmoe-pretrain`` under ``torchrun --no-python``) first on PATH."""
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PATH": path, **extra}


def run_pretrain(*args, check=True, env=None):
    """``ordmoe-pretrain`` on the CPU by design: its tests compare runs bit for bit."""
    proc = subprocess.run(
        [sys.executable, "-m", "ordmoe_megatron.train", *args],
        capture_output=True,
        text=True,
        timeout=900,
        env=env or cpu_env(),
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"ordmoe-pretrain {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def check_pretrain(*args, **env) -> subprocess.CompletedProcess:
    """``ordmoe-pretrain``'s dry run or refusal, in this process (a subprocess would spend most
    of its time importing torch and megatron-core), as ``run_pretrain`` would return it. Its
    checks must settle it: a run that gets past them to training fails the test. Unlike
    ``run_pretrain`` it sees this process's devices (the checks build nothing on them)."""
    import contextlib
    import io
    from unittest import mock

    from ordmoe_megatron.train import cli

    def past_the_checks(*_):
        raise AssertionError(f"ordmoe-pretrain {' '.join(args)} got past its checks to the run")

    out, err = io.StringIO(), io.StringIO()
    with (
        mock.patch.dict(os.environ, env),
        mock.patch.object(cli.run, "main", past_the_checks),
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        try:
            code = cli.main(list(args))
        except SystemExit as exit:
            code = exit.code
    if isinstance(code, str):  # SystemExit(message): the interpreter would print it and exit 1
        err.write(code + "\n")
        code = 1
    return subprocess.CompletedProcess(list(args), code or 0, out.getvalue(), err.getvalue())


def read_metrics(path):
    return [json.loads(line) for line in open(path)]


# ============================================================================================
# run_on_ranks
# ============================================================================================
class RankFailedError(RuntimeError):
    """A rank raised, died or timed out; the message carries the rank's traceback text."""


def _loopback_interface() -> Optional[str]:
    names = [name for _, name in socket.if_nameindex()]
    for name in ("lo", "lo0"):
        if name in names:
            return name
    return None


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, kwargs: dict, results: Any) -> None:
    # Keep gloo on the loopback interface: without this it binds to whatever the hostname
    # resolves to.
    loopback = _loopback_interface()
    if loopback is not None:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback)
    os.environ.update(
        MASTER_ADDR=LOOPBACK, MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank)
    )
    exit_when_parent_exits()  # don't outlive a parent killed without its cleanup
    # Two CPU cores shared by all ranks: avoid oversubscribing with intra-op threads.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    try:
        init_process_group("gloo", timeout_s=300)
        value = fn(rank, world_size, *args, **kwargs)
        payload = (rank, True, pickle.dumps(value))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        payload = (rank, False, traceback.format_exc())
    try:
        results.put(payload)
    except BaseException:  # noqa: BLE001
        results.put((rank, False, traceback.format_exc()))
    try:
        if torch.distributed.is_initialized():
            # Only tear down when this rank succeeded; a failed rank may have peers stuck in a
            # collective, and the parent kills everyone anyway.
            if payload[1]:
                torch.distributed.destroy_process_group()
    except Exception:  # noqa: BLE001 - teardown problems must not mask the result
        pass


def run_on_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 600.0, **kwargs: Any) -> list:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` spawned processes.

    Each process joins a gloo process group on a free 127.0.0.1 port through
    ``runtime.distributed.init_process_group`` (which installs the bridges) before ``fn``.
    Returns the per-rank return values, ordered by rank. If any rank raises, the others are killed
    and :class:`RankFailedError` is raised with that rank's traceback text; the same happens when a
    process dies without reporting, or when ``timeout`` seconds pass. (``timeout`` is consumed here,
    not passed to ``fn``.)
    """
    if world_size < 1:
        raise ValueError("world_size must be >= 1")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = find_free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(rank, world_size, port, fn, args, kwargs, results),
            daemon=False,
            name=f"ordmoe-rank{rank}",
        )
        for rank in range(world_size)
    ]
    # On the CPU by design, also on a GPU machine: the processes see no CUDA device.
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        for proc in procs:
            proc.start()
    finally:
        if visible is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = visible

    values: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(values) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(values))
                raise RankFailedError(f"run_on_ranks: timed out after {timeout:.0f}s; ranks {missing} did not finish")
            try:
                rank, ok, data = results.get(timeout=min(remaining, 1.0))
            except queue_lib.Empty:
                for rank, proc in enumerate(procs):
                    if rank not in values and not proc.is_alive():
                        # Give a result already in flight a moment to arrive.
                        try:
                            rank2, ok2, data2 = results.get(timeout=2.0)
                        except queue_lib.Empty:
                            raise RankFailedError(
                                f"run_on_ranks: rank {rank} exited with code {proc.exitcode} without reporting a result"
                            ) from None
                        _store(values, rank2, ok2, data2)
                        break
                continue
            _store(values, rank, ok, data)
    finally:
        for proc in procs:
            proc.join(timeout=5.0 if len(values) == world_size else 0.0)
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5.0)
        results.close()
    return [values[rank] for rank in range(world_size)]


def _store(values: dict, rank: int, ok: bool, data: Any) -> None:
    if not ok:
        raise RankFailedError(f"run_on_ranks: rank {rank} failed:\n{data}")
    values[rank] = pickle.loads(data)


# ============================================================================================
# devices
# ============================================================================================
def on_device(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor made on the CPU (for reproducible draws), on the device this process computes on."""
    return tensor.to(device())


# ============================================================================================
# megatron-core's MoE auxiliary-loss tracker (compat.moe_metrics_tracker tells the versions apart)
# ============================================================================================
def moe_aux_loss_values() -> dict:
    """``{name: per-layer values}`` recorded since the last reset, as they are (not reduced)."""
    tracker = compat.moe_metrics_tracker()
    if tracker is None:
        return {name: entry["values"] for name, entry in moe_utils.get_moe_layer_wise_logging_tracker().items()}
    return {name: entry.values for name, entry in tracker.metrics.items()}


def reset_moe_aux_losses() -> None:
    """Forget every tracked auxiliary loss (the trackers size themselves by the first model's
    layer count, so a test that builds models of other depths starts afresh)."""
    if compat.moe_metrics_tracker() is None:
        moe_utils.get_moe_layer_wise_logging_tracker().clear()
    else:
        from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker  # 0.18 on

        destroy_moe_metrics_tracker()


# ============================================================================================
# a tiny GPT-MoE and the OrdMoE schedule
# ============================================================================================
VOCAB, SEQ, BATCH = 64, 12, 2
SCHEDULE_BATCH = 4  # the micro-batch of tiny_batches (a sub-sampled lower path takes some of it)


def tiny_config(**extra):
    """A 3-layer, 8-expert top-2 ``TransformerConfig``; ``extra`` overrides its fields."""
    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

    kwargs = dict(
        num_layers=3,
        hidden_size=32,
        num_attention_heads=4,
        num_moe_experts=8,
        moe_router_topk=2,
        moe_token_dispatcher_type="alltoall",
        moe_aux_loss_coeff=1e-2,
        moe_router_load_balancing_type="aux_loss",
        hidden_dropout=0.0,
        attention_dropout=0.0,
        add_bias_linear=False,
        use_cpu_initialization=True,
        normalization="RMSNorm",
    )
    kwargs.update(extra)
    return (MLATransformerConfig if kwargs.get("multi_latent_attention") else TransformerConfig)(**kwargs)


def tiny_model(ordmoe: Optional[OrdMoEConfig] = None, seed: int = 7, packed: bool = False, **extra):
    """A plain ``GPTModel`` (``ordmoe=None``) or an ``OrdMoEGPTModel`` of ``tiny_config(**extra)``,
    on this process's device; the same seed gives the same weights either way. ``packed``: its
    local attention also runs THD packed sequences (``runtime.packed_attention``)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_decoder_block_spec,
        get_gpt_layer_local_spec,
        get_gpt_mtp_block_spec,
    )
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from ordmoe_megatron.mcore.model import OrdMoEGPTModel
    from ordmoe_megatron.method.layers import moe_layer_pattern

    config = tiny_config(**extra)
    if 0 in moe_layer_pattern(config.num_layers, config.moe_layer_freq):  # dense layers: a block spec
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm")
    else:
        spec = get_gpt_layer_local_spec(
            num_experts=config.num_moe_experts,
            moe_grouped_gemm=False,
            normalization="RMSNorm",
            multi_latent_attention=config.multi_latent_attention,
        )
    kwargs = dict(vocab_size=VOCAB, max_sequence_length=SEQ)
    if config.multi_latent_attention:  # its core attention without Transformer Engine; its own RoPE
        spec = bridges.local_mla_attention_spec(spec)
        kwargs["position_embedding_type"] = "rope"
    if config.mtp_num_layers:  # the MTP layer is the decoder's last, as Megatron-LM's gpt_builder makes it
        last = spec.layer_specs[-1] if hasattr(spec, "layer_specs") else spec
        kwargs["mtp_block_spec"] = get_gpt_mtp_block_spec(config, last, use_transformer_engine=False)
    if packed:
        from ordmoe_megatron.runtime.packed_attention import packed_attention_spec

        spec = packed_attention_spec(spec)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    if ordmoe is None:
        return GPTModel(config, spec, **kwargs).to(device())
    return OrdMoEGPTModel(config, spec, ordmoe=ordmoe, **kwargs).to(device())


def tiny_batch(seed: int = 0, batch: int = BATCH, masked: float = 0.3) -> dict:
    """A micro-batch of random tokens with about ``masked`` of the loss mask off, on the device."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (batch, SEQ + 1), generator=g)
    loss_mask = (torch.rand(batch, SEQ, generator=g) > masked).float()
    position_ids = torch.arange(SEQ).unsqueeze(0).expand(batch, -1)
    out = dict(tokens=tokens[:, :-1], labels=tokens[:, 1:], loss_mask=loss_mask, position_ids=position_ids)
    return {k: v.to(device()) for k, v in out.items()}


def packed_batch(batch: dict) -> dict:
    """``batch``'s rows as documents packed into one THD row: ``packed_seq_params`` with their
    ``cu_seqlens``, position ids restarting per document."""
    from megatron.core.packed_seq_params import PackedSeqParams

    rows, seq = batch["tokens"].shape
    cu = torch.arange(0, (rows + 1) * seq, seq, dtype=torch.int32, device=batch["tokens"].device)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=seq, max_seqlen_kv=seq)
    one_row = {k: v.reshape(1, -1) for k, v in batch.items()}
    return dict(one_row, packed_seq_params=params)


def hf_char_tokenizer(directory) -> str:
    """A character-level Hugging Face tokenizer saved in ``directory`` (no download); its path."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = ["<eos>", "<unk>"] + sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .:\n"))
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>").save_pretrained(directory)
    return str(directory)


def tiny_batches(count: int, seed: int = 0) -> list:
    """``count`` micro-batches of ``SCHEDULE_BATCH`` sequences, for the schedule tests."""
    return [tiny_batch(seed + i, SCHEDULE_BATCH, masked=0.2) for i in range(count)]


def lm_forward_step(data_iterator, model):
    """Megatron's ``forward_step_func`` with the package's LM loss."""
    from ordmoe_megatron.mcore.loss import lm_loss

    b = next(data_iterator)
    out = model(
        b["tokens"],
        b["position_ids"],
        None,
        labels=b["labels"],
        loss_mask=b["loss_mask"],
        packed_seq_params=b.get("packed_seq_params"),
    )
    return out, functools.partial(lm_loss, b["loss_mask"])


def ordmoe_schedule_step(model, cfg: OrdMoEConfig, batches: list, per_token=False, forward_only=False):
    """One ``forward_backward`` of the OrdMoE schedule for ``cfg``: reports and gradients."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from ordmoe_megatron.mcore.schedules import get_ordmoe_forward_backward_func

    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    model.zero_grad(set_to_none=True)
    model.config.calculate_per_token_loss = per_token
    model.config.grad_scale_func = lambda loss: loss * 1.0
    scale_func = model.config.grad_scale_func
    reports = get_ordmoe_forward_backward_func(cfg, VOCAB, per_token, seed=5, step_fn=lambda: 0)(
        forward_step_func=lm_forward_step,
        data_iterator=iter(batches),
        model=[model],
        num_microbatches=len(batches),
        seq_length=SEQ,
        micro_batch_size=batches[0]["tokens"].shape[0],
        forward_only=forward_only,
    )
    assert model.config.grad_scale_func is scale_func  # the sequential schedule's scaling is undone
    assert model.path_tiers == list(range(cfg.num_tiers)) and model.path_rows is None
    grads = None if forward_only else {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return reports, grads


def plain_loss_func(loss_mask, output_tensor):
    """Megatron-LM pretrain_gpt.py's loss function, for reference."""
    losses = output_tensor.view(-1).float()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().clone().detach().to(torch.int)
    return loss, num_tokens, {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])}


def train_steps(model, loss_func, steps=3, num_microbatches=2):
    """``steps`` Adam steps through Megatron's own schedule: per-step losses and gradients."""
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    # A backward outside the schedules leaves a 0-d aux-loss scale that the schedules cannot copy into.
    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    batches = [tiny_batch(100 + i) for i in range(steps * num_microbatches)]
    losses, grads = [], []
    for step in range(steps):
        data = iter(batches[step * num_microbatches : (step + 1) * num_microbatches])

        def forward_step(data_iterator, model):
            b = next(data_iterator)
            out = model(b["tokens"], b["position_ids"], None, labels=b["labels"], loss_mask=b["loss_mask"])
            return out, functools.partial(loss_func, b["loss_mask"])

        optimizer.zero_grad()
        reports = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=data,
            model=[model],
            num_microbatches=num_microbatches,
            seq_length=SEQ,
            micro_batch_size=BATCH,
            forward_only=False,
        )
        losses.append(torch.stack([r["lm loss"] for r in reports]))
        grads.append([p.grad.clone() for p in model.parameters()])
        optimizer.step()
    return losses, grads


def single_tier_and_plain_training(rank, world_size, extra):
    """Three steps of a plain ``GPTModel`` and of ``OrdMoEGPTModel`` with one tier, from the same
    weights and batches (a ``run_on_ranks`` body)."""
    from ordmoe_megatron.mcore.loss import ordmoe_loss
    from ordmoe_megatron.runtime.distributed import init_model_parallel

    init_model_parallel(seed=1234)
    plain = tiny_model(**extra)
    ordmoe_cfg = OrdMoEConfig(num_tiers=1)
    single = tiny_model(ordmoe_cfg, **extra)

    def ordmoe_loss_func(mask, out):
        return ordmoe_loss(mask, out, ordmoe=ordmoe_cfg, num_paths=1, vocab_size=VOCAB)

    return train_steps(plain, plain_loss_func), train_steps(single, ordmoe_loss_func)


# ============================================================================================
# a tiny vision-language model: megatron-core's CLIP ViT, an MLP projector, the tiny GPT-MoE
# ============================================================================================
IMAGE, PATCH, TEXT = 8, 4, 8  # 8x8 images of 4x4 patches: 4 image embeddings per image
IMAGE_TOKEN = -200  # LLaVAModel's default image token index


def tiny_llava(ordmoe: Optional[OrdMoEConfig] = None, seed: int = 7, **extra):
    """A plain ``LLaVAModel`` (``ordmoe=None``) or an ``OrdMoELLaVAModel`` whose language model
    is ``tiny_config(**extra)``; the same seed gives the same weights either way."""
    import dataclasses

    from megatron.core.enums import ModelType
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec, get_mlp_module_spec
    from megatron.core.models.multimodal.llava_model import LLaVAModel
    from megatron.core.models.vision.vit_layer_specs import get_vit_layer_with_local_spec
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.transformer_config import TransformerConfig

    from ordmoe_megatron.mcore.multimodal import OrdMoELLaVAModel

    language = tiny_config(**extra)
    vision = TransformerConfig(
        num_layers=1,
        hidden_size=16,
        num_attention_heads=2,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        add_bias_linear=True,
        use_cpu_initialization=True,
        tensor_model_parallel_size=language.tensor_model_parallel_size,
        sequence_parallel=False,
    )
    vision.vision_model_type = "clip"  # Megatron-LM sets it from --vision-model-type
    projection = dataclasses.replace(vision, hidden_size=language.hidden_size, ffn_hidden_size=2 * language.hidden_size)
    spec = get_gpt_layer_local_spec(
        num_experts=language.num_moe_experts, moe_grouped_gemm=False, normalization="RMSNorm"
    )
    args = dict(
        language_transformer_config=language,
        language_transformer_layer_spec=spec,
        language_vocab_size=VOCAB,
        language_max_sequence_length=SEQ + IMAGE_SEQ,
        vision_transformer_config=vision,
        vision_transformer_layer_spec=get_vit_layer_with_local_spec(),
        drop_vision_class_token=True,
        vision_projection_config=projection,
        vision_projection_layer_spec=compat.spec_submodules(get_mlp_module_spec(use_te=False)),
        img_h=IMAGE,
        img_w=IMAGE,
        patch_dim=PATCH,
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    model = LLaVAModel(**args) if ordmoe is None else OrdMoELLaVAModel(**args, ordmoe=ordmoe)
    model.model_type = ModelType.encoder_or_decoder  # as Megatron-LM's get_model sets it
    return model.to(device())


IMAGE_SEQ = (IMAGE // PATCH) ** 2  # image embeddings per image (the class token dropped)


def tiny_image_batch(seed: int = 0, batch: int = BATCH) -> dict:
    """A micro-batch of one image and ``SEQ - 1`` text tokens per sample (the image token first),
    with a random loss mask; LLaVA turns it into ``SEQ - 1 + IMAGE_SEQ`` positions."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, VOCAB, (batch, SEQ), generator=g)
    tokens = torch.cat([torch.full((batch, 1), IMAGE_TOKEN), text[:, :-1]], dim=1)
    out = dict(
        images=torch.randn(batch, 3, IMAGE, IMAGE, generator=g),
        tokens=tokens,
        labels=text,
        loss_mask=(torch.rand(batch, SEQ, generator=g) > 0.2).float(),
        position_ids=torch.arange(SEQ).unsqueeze(0).expand(batch, -1),
    )
    return {k: v.to(device()) for k, v in out.items()}


def llava_forward(model, b: dict):
    """``(per-token loss, loss mask)`` of ``LLaVAModel.forward`` on ``tiny_image_batch``'s batch."""
    return model(b["images"], b["tokens"], b["position_ids"], None, labels=b["labels"], loss_mask=b["loss_mask"])
