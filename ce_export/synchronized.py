"""Parity of artifacts with FP8 activation quantizers (fp8-w8a8), synchronized at each quantizer.

Free-running, the exported file and its fake-quantized PyTorch reference cannot agree to fp32
precision: their GEMMs differ in the last bits (~3e-7 relative), which moves an activation lying
on an FP8 rounding midpoint by a whole FP8 step (measured on the demo: x / scale = -15.5000010 in
PyTorch, -15.4999981 in ONNX Runtime), and later layers and routers amplify it (free-running
max relative logits error up to 9e-2 on the demo; more in fp16). So the pass criterion is this
check: ONNX Runtime runs with the input of every QuantizeLinear as an extra output, and the
reference's quantizer at the same point is fed ONNX Runtime's value (a forward pre-hook on the
module whose input it quantizes). Both then round the same numbers, and what remains between two
quantizers is ordinary float error. The dtype's usual threshold is applied to every output and to
every quantizer input as the reference computed it before being synchronized (the error
accumulated since the previous quantizer): a wrong scale, or a missing, extra or misplaced
quantizer shows there as whole FP8 steps even where a later quantizer would hide it from the
outputs. The free-running numbers are reported beside it.
"""

from __future__ import annotations

import torch

from ce_export import verify
from ce_export.capture import activation_sites, empty_past
from ce_export.errors import VerifyError
from ce_export.manifest import LogitsCheck
from ce_export.quantize import ACTIVATION_SCALE_SUFFIX
from ce_export.runners import OrtRunner, TorchRunner, greedy


class SynchronizedPair:
    """ONNX Runtime and the fake-quantized reference on the same inputs, the reference's FP8
    quantizers fed ONNX Runtime's values. Call it like a decoder: returns (reference outputs,
    ONNX Runtime outputs); `inputs` then holds, per quantizer, verify.compare of the reference's
    own quantizer input (before synchronizing it) against ONNX Runtime's."""

    def __init__(self, onnx_path, reference_lm: torch.nn.Module, exact_dequantize: bool = True,
                 logits: str = "all", path=None):
        """onnx_path: the file, or an onnx_ir model of it (e.g. onnx_precision's fp32 view), which gains
        outputs; `path` then names the file it was read from in messages."""
        import onnx_ir as ir

        in_memory = isinstance(onnx_path, ir.Model)
        model = onnx_path if in_memory else ir.load(onnx_path)
        where = path or ("model.onnx (in memory)" if in_memory else onnx_path)
        self.outputs = len(model.graph.outputs)
        self.site_of_output: dict[str, str] = {}  # QuantizeLinear input -> the site whose scale it uses
        for node in model.graph:
            if node.op_type == "QuantizeLinear" and node.inputs[1].name.endswith(ACTIVATION_SCALE_SUFFIX):
                value = node.inputs[0]
                if value.name in self.site_of_output:
                    continue
                site = node.inputs[1].name.removesuffix(ACTIVATION_SCALE_SUFFIX).removeprefix("lm.")
                if site in self.site_of_output.values():  # e.g. a file whose optimizer merged equal scales
                    raise VerifyError(f"{where}: two FP8 quantizers use the scale of {site}: which site each "
                                      "quantizes cannot be told (rebuild the artifact)")
                if value not in model.graph.outputs:  # (DeepSeek's cached latent already is one)
                    model.graph.outputs.append(value)
                self.site_of_output[value.name] = site
        if not self.site_of_output:
            raise VerifyError(f"{where}: no FP8 activation QuantizeLinear found")
        self.runtime = OrtRunner(model, exact_dequantize=exact_dequantize, weights_as_stored=True, path=where)
        self.reference = TorchRunner(reference_lm, logits)
        self._feeds: dict[str, torch.Tensor] = {}
        self._replaced: dict[int, torch.Tensor] = {}
        self.inputs: dict[str, dict] = {}
        self._handles = [module.register_forward_pre_hook(self._hook(name))
                         for name, module, _ in activation_sites(reference_lm)]

    def _hook(self, site: str):
        def hook(module, args):
            x = args[0]
            seen = self._replaced.get(id(x))
            if seen is not None and seen[0] is x:  # e.g. k/v projections: the exporter shared q's QuantizeLinear
                replacement = seen[1]
            elif site in self._feeds:
                replacement = self._feeds[site].reshape(x.shape).to(x.dtype)
                self.inputs[site] = verify.compare(x, replacement)
                self._replaced[id(x)] = (x, replacement)  # holding x keeps its id unique during the call
            else:
                return None
            return (replacement, *args[1:])
        return hook

    def __call__(self, input_ids, attention_mask, position_ids, past):
        outputs = self.runtime(input_ids, attention_mask, position_ids, past)
        named = dict(zip(self.runtime.output_names, outputs))
        self._feeds = {site: named[name] for name, site in self.site_of_output.items()}
        self._replaced, self.inputs = {}, {}
        try:
            expected = self.reference(input_ids, attention_mask, position_ids, past)
        finally:
            self._feeds, self._replaced = {}, {}
        return list(expected), outputs[:self.outputs]

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self.runtime = None


def check_logits(pair: SynchronizedPair, spec, output_names, dtype, tolerance: verify.Tolerance,
                 cases=verify.PARITY_CASES, seed: int = 0) -> LogitsCheck:
    """verify.check_logits's report, the reference synchronized at each FP8 quantizer."""
    gen = torch.Generator().manual_seed(seed)
    results, synchronized = [], set()
    for case in cases:
        inputs = verify.random_inputs(case, spec, dtype, gen)
        expected, actual = pair(*inputs)
        per_output = {name: verify.compare(e, a) for name, e, a in zip(output_names, expected, actual)}
        per_output.update({f"fp8 input of {site}": entry for site, entry in pair.inputs.items()})
        synchronized |= set(pair.inputs)
        results.append(verify.case_result(case, expected[0], actual[0], per_output))
    return verify.summarize_cases(results, tolerance, synchronized_at_fp8_quantizers=sorted(synchronized))


def check_generation(pair: SynchronizedPair, spec, dtype, tolerance: verify.Tolerance,
                     new_tokens: int = verify.GENERATION_TOKENS) -> dict:
    """Greedy generation by ONNX Runtime from verify's prompt; at every step the synchronized
    reference, given the same tokens and ONNX Runtime's KV cache, must pick the same next token,
    or one whose logit is within the near-tie tolerance of its own choice."""
    ids, mask = verify.generation_prompt(spec.vocab_size)
    onnx_tokens, torch_tokens = [], []
    rows = [{"identical": True, "first_difference": None, "near_tie_margin": None, "passed": True} for _ in ids]
    reference = {}

    def onnx_runtime_step(*inputs):
        expected, actual = pair(*inputs)
        reference["logits"] = expected[0][:, -1].float()
        return actual

    steps = greedy(onnx_runtime_step, ids, mask, empty_past(spec, ids.shape[0], 0, dtype), new_tokens)
    for step, (chosen, _) in enumerate(steps):
        chosen = chosen[:, 0]
        reference_logits = reference["logits"]
        preferred = reference_logits.argmax(-1)
        for index, row in enumerate(rows):
            if chosen[index] == preferred[index]:
                continue
            logits = reference_logits[index]
            margin = ((logits[preferred[index]] - logits[chosen[index]]) / logits.abs().max()).item()
            if row["identical"]:
                row.update(identical=False, first_difference=step)
            row["near_tie_margin"] = max(row["near_tie_margin"] or 0.0, margin)
            row["passed"] = row["near_tie_margin"] <= tolerance.near_tie
        onnx_tokens.append(chosen)
        torch_tokens.append(preferred)
    return {"new_tokens": new_tokens, "near_tie_tolerance": tolerance.near_tie,
            "passed": all(r["passed"] for r in rows), "rows": rows,
            "synchronized_at_fp8_quantizers": True, "teacher_forced": "on ONNX Runtime's tokens and KV cache",
            "torch_tokens": torch.stack(torch_tokens, 1).tolist(), "onnx_tokens": torch.stack(onnx_tokens, 1).tolist()}
