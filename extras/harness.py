"""lm-evaluation-harness on this project's models: the harness's model interface (lm_eval.api.model.LM)
over eval.py's own scorer, registered as the model type "rolora" (optional: pip install lm_eval).

Any checkpoint the project loads (plain, rotated, merged, quantized) or any model built in Python
(rotated, quantized, ...) answers the harness's three requests: loglikelihood (eval.encode_pair
and eval.score_rows, with the shared-prefix KV cache), loglikelihood_rolling (the harness's
disjoint windows) and generate_until (model.generate, greedy, with the KV cache). So the harness
reproduces eval.py's numbers on the same items, and adds its hundreds of tasks.

lm_eval looks models up in its registry, which only the modules imported in its process fill
(it reads no plugin entry points; --include_path adds tasks, not models). So its command line
runs after importing this file, from the repository root:
    python -c "import extras.harness as h, lm_eval.__main__ as m; h.harness_model_class(); m.cli_evaluate()" \
        --model rolora --model_args pretrained=DIR --tasks arc_easy --device cpu --batch_size 32
From Python: lm_eval.simple_evaluate(model=HarnessModel(model=model, tokenizer=tokenizer), tasks=[...]).
"""
import functools
import math

import torch
from tqdm import tqdm

from eval import encode_pair, load_model, make_row, score_rows
from extras.int_kernels import use_integer_kernels


def __getattr__(name):  # PEP 562: `from extras.harness import HarnessModel` imports lm_eval only then
    if name == "HarnessModel":
        return harness_model_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def harness_model_class():
    """The lm_eval.api.model.LM of this project's models, registered as "rolora". Built on the first
    call, so that importing this file never needs lm_eval; its scores are eval.py's (encode_pair, score_rows)."""
    try:
        import lm_eval.models  # noqa: F401  (the harness's own models, registered before ours)
    except ImportError as e:
        raise ImportError("the lm-evaluation-harness adapter needs the optional package lm_eval: "
                          "pip install lm_eval") from e
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    @register_model("rolora")
    class HarnessModel(LM):
        """From a checkpoint (pretrained=DIR, or a name load_model knows: plain, rotated, merged,
        quantized alike) or from a built model= and tokenizer=. batch_size counts rows, as eval.py's
        does; add_bos_token is eval.py's --bos; max_length defaults to max_position_embeddings;
        int_kernels=True is --int-kernels (a quantized model's linears on int8 products, in place)."""

        def __init__(self, pretrained=None, model=None, tokenizer=None, dtype="float32", device="cpu",
                     batch_size=32, max_batch_size=None, add_bos_token=False, max_length=None,
                     max_gen_toks=256, share_prefix=True, int_kernels=False):  # max_batch_size: always passed
            super().__init__()
            if pretrained is not None:
                if str(device).startswith("cuda") and not torch.cuda.is_available():
                    device = "cpu"  # the harness's command line defaults to cuda:0, as HFLM falls back
                model, tokenizer, _ = load_model(pretrained, dtype=getattr(torch, dtype), device=device)
            if model is None or tokenizer is None:
                raise ValueError("HarnessModel needs pretrained=DIR, or both model= and tokenizer=")
            if int_kernels:
                use_integer_kernels(model)
            self.model, self.tokenizer, self._device = model.eval(), tokenizer, model.lm_head.weight.device
            self.batch_size = 32 if str(batch_size).startswith("auto") else int(batch_size)  # no auto search
            self.add_bos, self.share_prefix, self.max_gen_toks = add_bos_token, share_prefix, max_gen_toks
            self.max_length = min(max_length or math.inf, model.config.max_position_embeddings)
            self.prefix_id = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id

        def _scores(self, rows, items, disable_tqdm, desc):
            return score_rows(self.model, rows, items, self.batch_size, self.share_prefix, not disable_tqdm, desc)

        def _answer(self, kind, requests, results):  # what --use_cache stores
            for request, result in zip(requests, results):
                self.cache_hook.add_partial(kind, request.args, result)
            return results

        def loglikelihood(self, requests, disable_tqdm=False):
            """(sum of the continuation's log-probs, is_greedy) per (context, continuation)."""
            rows = [make_row(i, *encode_pair(self.tokenizer, *r.args, self.add_bos), self.max_length)
                    for i, r in enumerate(requests)]
            items = {}  # the choices of one document share their context's KV cache
            for i, r in enumerate(requests):
                items.setdefault(i if r.doc_id is None else (r.task_name, r.doc_id), []).append(i)
            return self._answer("loglikelihood", requests,
                                self._scores(rows, list(items.values()), disable_tqdm, "loglikelihood"))

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            """Each text's log-likelihood after the prefix token: the harness's disjoint windows of
            max_length tokens, every token predicted once (HFLM's loglikelihood_rolling)."""
            rows, owner = [], []
            for i, r in enumerate(requests):
                tokens = self.tokenizer.encode(r.args[0], bos=self.add_bos)
                for window in get_rolling_token_windows(tokens, self.prefix_id, self.max_length, context_len=1):
                    rows.append(make_row(len(rows), *make_disjoint_window(window), self.max_length))
                    owner.append(i)
            totals = [0.0] * len(requests)
            for i, (ll, _) in zip(owner, self._scores(rows, None, disable_tqdm, "loglikelihood_rolling")):
                totals[i] += ll
            return self._answer("loglikelihood_rolling", requests, totals)

        def generate_until(self, requests, disable_tqdm=False):
            """Greedy continuations (model.generate, KV cache) of at most max_gen_toks tokens, cut before
            the first of the `until` strings. generate has no stop hook: it runs to EOS or max_gen_toks."""
            out = []
            for r in tqdm(requests, desc="generate_until", disable=disable_tqdm, leave=False):
                context, kwargs = r.args
                if kwargs.get("do_sample"):
                    raise NotImplementedError("generate_until: greedy decoding only (do_sample=False)")
                until = kwargs.get("until") or []
                n_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
                if n_new >= self.max_length:
                    raise ValueError(f"max_gen_toks {n_new} leaves no room for the context in {self.max_length}")
                ids = self.tokenizer.encode(context, bos=self.add_bos)[-(self.max_length - n_new):] or [self.prefix_id]
                new = self.model.generate(torch.tensor([ids], device=self._device), n_new,
                                          eos_id=self.tokenizer.eos_id)[0, len(ids):].tolist()
                text = self.tokenizer.decode(new[:-1] if new[-1:] == [self.tokenizer.eos_id] else new)
                for stop in [until] if isinstance(until, str) else until:
                    text = text.split(stop)[0] if stop else text
                out.append(text)
            return self._answer("generate_until", requests, out)

    return HarnessModel
