"""Train the demo models on the CPU: a plain top-4 MoE, then its Compressed-Experts fine-tune.

    nice -n 19 python -m ce_export.demo.training [--out ce_export/demo/weights] [--threads 1]

1. plain: an OLMoE-architecture model (ce_export.demo.DEMO_CONFIG's sizes: hidden 128, 4 layers,
   8 experts, top-4) trained from scratch on the demo language (language.py), next-token loss on
   every token plus OLMoE's load-balancing loss (coefficient 0.01).
2. ce: the plain model with n_ce = 2 of its top-4 turned into compressed experts: each layer gets
   `ces` [E, 3, H] initialised to ones, so that the model starts as exactly "the top-2 of the
   top-4, no renormalisation" (the CE paper's starting point), and every weight is then
   fine-tuned briefly with the CE forward. It starts from exactly the written plain checkpoint
   (weights rounded to fp16), so `--plain-from` (the CE phase alone, from a plain.safetensors
   written earlier) gives the same result as the whole run.

The MoE blocks train through ce_export.moe_math.moe_reference (the math every exported artifact is
checked against); the rest is transformers' OlmoeForCausalLM. Everything is seeded; the run is
deterministic for a given torch version and thread count. The weights are written in the CE
reference code's on-disk layout (per-expert tensors), rounded to fp16 (the package ships them that
way; `write_demo_checkpoint` writes them as fp32), with training.json: the command, the machine,
the time and the accuracy of each model measured on the written weights.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ce_export import moe_math
from ce_export.demo import language

SEQ_LEN = 64


@dataclass(frozen=True)
class Phase:
    name: str
    steps: int
    learning_rate: float
    warmup: int
    seed: int
    n_ce: int = 0


PLAIN = Phase("plain", steps=4000, learning_rate=3e-3, warmup=200, seed=1)
CE = Phase("ce", steps=800, learning_rate=1e-3, warmup=50, seed=2, n_ce=2)
BATCH = 32
WEIGHT_DECAY = 0.1
AUX_LOSS = 0.01
# The prompts are random (operands, keys, words): their tokens are mostly unpredictable, and a full
# weight on them slowed the answers' learning. They keep a small weight, so that the model still
# writes well-formed problems when it runs on past an answer.
PROMPT_WEIGHT = 0.1
INIT_STD = 0.02


class TrainableMoe(nn.Module):
    """One OLMoE MoE block with trainable weights, computed by moe_math.moe_reference."""

    def __init__(self, config: dict, generator: torch.Generator):
        super().__init__()
        hidden, inter, experts = config["hidden_size"], config["intermediate_size"], config["num_experts"]
        self.top_k, self.n_ce = config["num_experts_per_tok"], 0
        self.router = nn.Parameter(torch.randn(experts, hidden, generator=generator) * INIT_STD)
        self.gate_up = nn.Parameter(torch.randn(experts, 2 * inter, hidden, generator=generator) * INIT_STD)
        self.down = nn.Parameter(torch.randn(experts, hidden, inter, generator=generator) * INIT_STD)
        self.ces = None
        self.router_logits = None

    def add_compressed_experts(self, n_ce: int) -> None:
        """CE's starting point: ces = 1 makes the block the top-(K - n_ce) of its top-K, unrenormalised."""
        experts, _, hidden = self.gate_up.shape
        self.ces = nn.Parameter(torch.ones(experts, 3, hidden))
        self.n_ce = n_ce

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """moe_math.moe_reference's result, computed densely: every expert on every token, each
        scaled by its routing weight (0 unless it is one of the token's main experts). Two large
        GEMMs per block instead of a loop over experts: twice the FLOPs of top-4, many times faster
        to train on a CPU (tests/test_demo_model.py checks it against moe_reference)."""
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        experts, double_inter, hidden = self.gate_up.shape
        inter = double_inter // 2
        self.router_logits = F.linear(flat, self.router)
        weights, selected = moe_math.route_softmax_topk(self.router_logits, self.top_k, norm_topk_prob=False)
        n_main = self.top_k - self.n_ce
        combine = torch.zeros_like(self.router_logits).scatter(1, selected[:, :n_main], weights[:, :n_main])
        gate_w = self.gate_up[:, :inter].reshape(experts * inter, hidden)
        up_w = self.gate_up[:, inter:].reshape(experts * inter, hidden)
        if self.n_ce:
            theta = moe_math.mix_compressed_experts(weights[:, n_main:], selected[:, n_main:], self.ces)
            gate = F.linear(flat * theta[:, moe_math.CES_GATE_INPUT, :hidden], gate_w).view(-1, experts, inter)
            up = F.linear(flat * theta[:, moe_math.CES_UP_INPUT, :hidden], up_w).view(-1, experts, inter)
            act = F.silu(gate) * up * theta[:, None, moe_math.CES_ACTIVATION, :inter]
        else:
            act = F.silu(F.linear(flat, gate_w).view(-1, experts, inter)) * F.linear(flat, up_w).view(-1, experts, inter)
        act = (act * combine[:, :, None]).reshape(-1, experts * inter)
        out = F.linear(act, self.down.transpose(1, 2).reshape(experts * inter, hidden).T)
        return out.reshape(hidden_states.shape)


def load_balancing_loss(router_logits: list[torch.Tensor], top_k: int) -> torch.Tensor:
    """OLMoE's auxiliary loss: E * sum_e (fraction of routed slots to e) * (mean router probability of e)."""
    logits = torch.cat(router_logits)
    probs = logits.float().softmax(-1)
    chosen = F.one_hot(probs.topk(top_k, dim=-1).indices, probs.shape[-1]).sum(1).float()
    return probs.shape[-1] * (chosen.mean(0) / top_k * probs.mean(0)).sum()


def build_model(config: dict, seed: int) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    hf_config = AutoConfig.for_model(**{k: v for k, v in config.items() if k not in ("use_ce", "n_ce")})
    hf_config.initializer_range = INIT_STD
    lm = AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa")
    generator = torch.Generator().manual_seed(seed)
    for layer in lm.model.layers:
        layer.mlp = TrainableMoe(config, generator)
    return lm


def moe_blocks(lm: nn.Module) -> list[TrainableMoe]:
    return [layer.mlp for layer in lm.model.layers]


def batches(seed: int):
    """Endless batches of whole training lines packed from position 0: token ids [BATCH, SEQ_LEN]
    (padded with PAD_TOKEN_ID) and each token's weight as a prediction target (answers 1, prompts
    PROMPT_WEIGHT, padding 0)."""
    stream = language.problems(seed)
    pending = None
    while True:
        ids = torch.full((BATCH, SEQ_LEN), language.PAD_TOKEN_ID, dtype=torch.long)
        weights = torch.zeros(BATCH, SEQ_LEN)
        for row in range(BATCH):
            filled = 0
            while True:
                problem = pending or next(stream)
                pending = None
                tokens, prompt = language.encode(problem.line), len(language.encode(problem.prompt))
                if filled + len(tokens) > SEQ_LEN:
                    pending = problem
                    break
                ids[row, filled:filled + len(tokens)] = torch.tensor(tokens)
                weights[row, filled:filled + prompt] = PROMPT_WEIGHT
                weights[row, filled + prompt:filled + len(tokens)] = 1.0
                filled += len(tokens)
        yield ids, weights


def train(lm: nn.Module, phase: Phase, report=partial(print, flush=True), evaluate=None, every: int = 100) -> list[dict]:
    """AdamW with warm-up and cosine decay to 10%; every `every` steps (and at the end) logs the loss
    and `evaluate(lm)`'s result (a dict), when given."""
    parameters = [p for p in lm.parameters() if p.requires_grad]
    decay = [p for p in parameters if p.ndim >= 2]
    no_decay = [p for p in parameters if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=phase.learning_rate, betas=(0.9, 0.95))

    def schedule(step):
        if step < phase.warmup:
            return (step + 1) / phase.warmup
        progress = (step - phase.warmup) / max(1, phase.steps - phase.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    blocks = moe_blocks(lm)

    def losses(ids, weights):
        logits = lm(input_ids=ids, use_cache=False).logits
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        target_weights = weights[:, 1:].reshape(-1)
        loss = (nll * target_weights).sum() / target_weights.sum()
        return loss, load_balancing_loss([b.router_logits for b in blocks], blocks[0].top_k)
    log = []
    lm.train()
    start = time.perf_counter()
    data = batches(phase.seed)
    for step in range(phase.steps):
        ids, weights = next(data)
        loss, aux = losses(ids, weights)
        optimizer.zero_grad(set_to_none=True)
        (loss + AUX_LOSS * aux).backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        scheduler.step()
        if step % every == 0 or step == phase.steps - 1:
            entry = {"step": step, "loss": loss.item(), "aux": aux.item(), "seconds": time.perf_counter() - start}
            if evaluate is not None and (step % (5 * every) == 0 or step == phase.steps - 1):
                lm.eval()
                entry.update(evaluate(lm))
                lm.train()
            log.append(entry)
            report(f"[{phase.name}] step {step}/{phase.steps}: " + ", ".join(
                f"{key} {value:.4g}" for key, value in entry.items() if key != "step"))
    lm.eval()
    return log


def checkpoint_tensors(lm: nn.Module) -> dict[str, torch.Tensor]:
    """The trained model's tensors under the CE reference code's on-disk names (per-expert experts)."""
    tensors = {}
    for name, tensor in lm.state_dict().items():
        if ".mlp." not in name:
            tensors[name] = tensor
    for index, block in enumerate(moe_blocks(lm)):
        prefix = f"model.layers.{index}.mlp."
        inter = block.down.shape[2]
        tensors[prefix + "gate.weight"] = block.router
        for expert in range(block.gate_up.shape[0]):
            tensors[f"{prefix}experts.{expert}.gate_proj.weight"] = block.gate_up[expert, :inter]
            tensors[f"{prefix}experts.{expert}.up_proj.weight"] = block.gate_up[expert, inter:]
            tensors[f"{prefix}experts.{expert}.down_proj.weight"] = block.down[expert]
        if block.ces is not None:
            tensors[prefix + "ces"] = block.ces
    return {name: tensor.detach().to(torch.float16).contiguous() for name, tensor in tensors.items()
            if not name.endswith("rotary_emb.inv_freq")}


def round_to_stored(lm: nn.Module) -> None:
    """The weights as written (fp16), so that what follows starts from the checkpoint on disk."""
    with torch.no_grad():
        for parameter in lm.parameters():
            parameter.copy_(parameter.to(torch.float16).float())


def load_plain(lm: nn.Module, path: Path) -> None:
    """A plain checkpoint written by `checkpoint_tensors` back into the training model."""
    from safetensors.torch import load_file

    tensors = {name: tensor.float() for name, tensor in load_file(str(path)).items()}
    state = {name: tensors.pop(name) for name in list(tensors) if ".mlp." not in name}
    for index, block in enumerate(moe_blocks(lm)):
        prefix = f"model.layers.{index}.mlp."
        experts = block.gate_up.shape[0]
        state[f"{prefix}router"] = tensors.pop(prefix + "gate.weight")
        state[f"{prefix}gate_up"] = torch.stack([torch.cat([tensors.pop(f"{prefix}experts.{e}.gate_proj.weight"),
                                                            tensors.pop(f"{prefix}experts.{e}.up_proj.weight")])
                                                 for e in range(experts)])
        state[f"{prefix}down"] = torch.stack([tensors.pop(f"{prefix}experts.{e}.down_proj.weight") for e in range(experts)])
    if tensors:
        raise ValueError(f"{path}: not a plain demo checkpoint (unexpected tensors {sorted(tensors)[:3]})")
    missing, unexpected = lm.load_state_dict(state, strict=False)
    if unexpected or [name for name in missing if not name.endswith("rotary_emb.inv_freq")]:
        raise ValueError(f"{path}: does not fit the training model (missing {missing[:3]}, unexpected {unexpected[:3]})")


def measure(weights: Path, compressed: bool, scratch: Path) -> dict:
    """Exact match and held-out perplexity of the written weights, through ce_export's own loading
    path (the captured PyTorch model, MoE blocks through moe_math)."""
    from ce_export.capture import build_torch_model
    from ce_export.demo import write_demo_checkpoint
    from ce_export.load import load_checkpoint
    from ce_export.pipeline import EVAL_SEQ_LEN, TASK_PERPLEXITY_SEQUENCES
    from ce_export.runners import TorchRunner
    from ce_export.task import exact_match, held_out_sequences, read_task
    from ce_export.tokenizer import load_tokenizer
    from ce_export.verify import perplexity

    folder = write_demo_checkpoint(scratch / ("ce" if compressed else "plain"), compressed, force=True, weights=weights)
    loaded = load_checkpoint(folder)
    task, tokenizer = read_task(folder), load_tokenizer(folder)
    runtime = TorchRunner(build_torch_model(loaded, torch.float32))
    result = exact_match(runtime, task, tokenizer, loaded.spec, torch.float32)
    result.pop("correct_by_problem")
    sequences = held_out_sequences(task, tokenizer, EVAL_SEQ_LEN, TASK_PERPLEXITY_SEQUENCES)  # as a build's report
    result["perplexity"] = perplexity(runtime, sequences, loaded.spec, torch.float32)
    return result


class _Shapes:
    """The KV-cache shapes task.exact_match's decoding loop needs (ModelSpec.past_shapes) of a training model."""

    def __init__(self, config: dict):
        self.config = config

    def past_shapes(self, batch: int, past: int) -> list[tuple[int, int, int, int]]:
        c = self.config
        shape = (batch, c["num_key_value_heads"], past, c["hidden_size"] // c["num_attention_heads"])
        return [shape] * (2 * c["num_hidden_layers"])


def progress_evaluation(config: dict, every_nth_problem: int = 4):
    """Exact match of the training model on a quarter of the held-out problems (the training log)."""
    from ce_export.demo import demo_task
    from ce_export.runners import TorchRunner
    from ce_export.task import ByteTokens, Task, exact_match

    task = demo_task()
    subset = Task(task.name, task.description, task.stop, "", task.held_out[::every_nth_problem])

    def evaluate(lm):  # the demo's tokenizer is the byte identity
        result = exact_match(TorchRunner(lm), subset, ByteTokens(config["vocab_size"]), _Shapes(config), torch.float32)
        return {"accuracy": result["accuracy"], **result["per_task"]}

    return evaluate


def main(argv=None) -> int:
    import tempfile

    from safetensors.torch import save_file

    from ce_export.demo import WEIGHTS, TRAINING_RECORD, demo_config, weights_file

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=WEIGHTS, help="where plain.safetensors, ce.safetensors and "
                                                                  f"{TRAINING_RECORD} go (default: the package's)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared 2-core machine two threads ran 10x slower, each "
                             "waiting for the other at every op)")
    parser.add_argument("--plain-steps", type=int, default=PLAIN.steps)
    parser.add_argument("--ce-steps", type=int, default=CE.steps)
    parser.add_argument("--plain-from", type=Path, metavar="SAFETENSORS",
                        help="skip the plain phase: fine-tune CE from this plain.safetensors (written by an earlier run)")
    args = parser.parse_args(argv)
    command = "python -m ce_export.demo.training " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"command": command, "machine": {"platform": platform.platform(), "processor": platform.processor()
                                              or platform.machine(), "torch_threads": args.threads},
              "torch": torch.__version__, "batch": BATCH, "sequence": SEQ_LEN, "phases": {}}
    start = time.perf_counter()
    lm = build_model(demo_config(False), PLAIN.seed)
    evaluate = progress_evaluation(demo_config(False))
    with tempfile.TemporaryDirectory() as scratch:
        for phase, steps in ((PLAIN, args.plain_steps), (CE, args.ce_steps)):
            phase = Phase(**{**asdict(phase), "steps": steps})
            compressed = bool(phase.n_ce)
            phase_start = time.perf_counter()
            if not compressed and args.plain_from is not None:
                load_plain(lm, args.plain_from)
                if weights_file(False, args.out).resolve() != args.plain_from.resolve():
                    save_file(checkpoint_tensors(lm), str(weights_file(False, args.out)), metadata={"format": "pt"})
                entry = {"from": str(args.plain_from)}
            else:
                if compressed:
                    for block in moe_blocks(lm):
                        block.add_compressed_experts(phase.n_ce)
                entry = {**asdict(phase), "log": train(lm, phase, evaluate=evaluate, every=50)}
                save_file(checkpoint_tensors(lm), str(weights_file(compressed, args.out)), metadata={"format": "pt"})
                round_to_stored(lm)
            seconds = time.perf_counter() - phase_start
            quality = measure(args.out, compressed, Path(scratch))
            print(f"[{phase.name}] {seconds:.0f} s; exact match {quality['accuracy']:.4f} "
                  f"({quality['per_task']}), held-out perplexity {quality['perplexity']:.4f}", flush=True)
            record["phases"][phase.name] = {**entry, "seconds": seconds, "quality": quality}
    record["seconds"] = time.perf_counter() - start
    (args.out / TRAINING_RECORD).write_text(json.dumps(record, indent=1) + "\n")
    print(f"weights and {TRAINING_RECORD}: {args.out} ({record['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
