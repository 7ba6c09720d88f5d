"""`plinth.load(MODEL)`: a model plus its tokenizer, ready to generate, chat, score and embed.

    m = plinth.load("smollm2-135m-instruct")
    print(m.chat([{"role": "user", "content": "What is the capital of France?"}]))
    for piece in m.generate("def fib(n):", max_tokens=40, stream=True): print(piece, end="")
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from plinth import hub
from plinth.adapt.tools import run_tools as tools_loop
from plinth.constrain import response_format_grammar
from plinth.errors import PlinthError
from plinth.generate import SamplingParams, generate_stream
from plinth.model import Transformer
from plinth.quant import compact_
from plinth.tokenizer import Tokenizer
from plinth.train import checkpoint
from plinth.weights.gguf import read_gguf
from plinth.weights.hf import is_hf_folder, read_hf_folder


def read_model(path: Path) -> tuple[Transformer, Tokenizer, str]:
    """A float32 model, its tokenizer, and the compact dtype suited to the file's precision."""
    if path.is_file() and path.suffix == ".gguf":
        config, state_dict, tokenizer, dtype = read_gguf(path)
    elif is_hf_folder(path):
        (config, state_dict), tokenizer, dtype = read_hf_folder(path), Tokenizer.from_folder(path), "int8"
    elif checkpoint.is_checkpoint(path):
        (config, state_dict), tokenizer, dtype = checkpoint.read_checkpoint(path), Tokenizer.from_folder(path), "int8"
    else:
        raise PlinthError(f"cannot load {path}: plinth reads .gguf files, Hugging Face model folders and plinth "
                          "checkpoint folders; give the path of one or a known model name (`plinth list`)")
    model = Transformer(config)
    model.load_weights(state_dict)
    return model.eval(), tokenizer, dtype


class LoadedModel:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, name: str = "model", load_seconds: float = 0.0,
                 head=None):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.load_seconds = load_seconds
        self.head = head  # a classification or regression head, for models fine-tuned with task=classify/regress

    def _params(self, response_format=None, **options) -> SamplingParams:
        if response_format is not None:  # OpenAI's shape or a pydantic model class: constrained decoding
            options["grammar"] = response_format_grammar(response_format)
        try:
            return SamplingParams(**options).validate(self.tokenizer.vocab_size)
        except TypeError as e:
            raise PlinthError(f"unknown sampling option: {e}") from e

    def generate(self, prompt: str | list[int], stream: bool = False, **options):
        """Complete `prompt` (text or token ids). Returns the text, or with stream=True an iterator
        of text pieces. Options are `SamplingParams` fields (max_tokens, temperature, top_p, stop, ...)
        and `response_format` (JSON object / JSON schema, enforced by constrained decoding)."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        steps = generate_stream(self.model, self.tokenizer, ids, self._params(**options))
        pieces = (step.text for step in steps if step.text)
        return pieces if stream else "".join(pieces)

    def chat(self, messages: list[dict], stream: bool = False, **options):
        """Reply to a conversation rendered through the model's own chat template."""
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.generate(self.tokenizer.encode(prompt, add_bos=False), stream=stream, **options)

    def run_tools(self, messages: list[dict], tools: list[dict] | None = None, functions=(), **options) -> list[dict]:
        """Chat while letting the model call Python `functions`; returns the conversation, answer last
        (plinth.adapt.tools.run_tools)."""
        return tools_loop(self, messages, tools, functions, **options)

    @torch.inference_mode()
    def logits(self, text: str | list[int]) -> torch.Tensor:
        """Next-token logits (T, V) for every position of `text`, as float32."""
        ids = self.tokenizer.encode(text) if isinstance(text, str) else list(text)
        return self.model(torch.tensor([ids]))[0].float()

    @torch.inference_mode()
    def embed(self, texts: list[str] | str) -> torch.Tensor:
        """Mean of the final hidden states per text, L2-normalised: (N, C)."""
        texts = [texts] if isinstance(texts, str) else texts
        rows = [self.model.features(torch.tensor([self.tokenizer.encode(t) or [0]]))[0].float().mean(0) for t in texts]
        return torch.nn.functional.normalize(torch.stack(rows), dim=-1)


    def classify(self, texts: list[str] | str) -> list[str]:
        """Labels from the classifier head of a model fine-tuned with task=classify."""
        from plinth.adapt.classify import classify
        return classify(self, texts)

    def predict(self, texts: list[str] | str) -> list:
        """The head's answer per text: a label (task=classify) or a number (task=regress)."""
        from plinth.adapt.classify import predict
        return predict(self, texts)


def load(model: str = hub.DEFAULT_MODEL, dtype: str | None = None, adapter: str | None = None) -> LoadedModel:
    """Load a known model name, a .gguf file path, or a plinth checkpoint / fine-tuning run folder.

    dtype: float32, bfloat16, int8 or int4. The default on CPU keeps weights compact, because decoding
    reads every weight once per token: int4 for 4-bit files (their exact codes), else int8.
    adapter: a LoRA adapter folder, merged into the weights before they are made compact.
    """
    from plinth.adapt.finetune import read_adapted  # deferred: adapt builds on this module
    start = time.perf_counter()
    net, tokenizer, compact, head = read_adapted(hub.resolve(model), adapter)
    if dtype is None:
        dtype = compact if hasattr(torch, "_weight_int4pack_mm_for_cpu") else "float32"
    compact_(net, dtype)
    return LoadedModel(net, tokenizer, name=model, load_seconds=time.perf_counter() - start, head=head)
