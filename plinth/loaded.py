"""What `plinth.load(MODEL)` returns: a model plus its tokenizer, ready to generate, chat, score,
embed and (with a fine-tuned head) classify.

    m = plinth.load("smollm2-135m-instruct")
    print(m.chat([{"role": "user", "content": "What is the capital of France?"}]))
    print(plinth.load("runs/vqa-easy/final").chat([{"role": "user", "content": [
        {"type": "image", "image": "shape.png"}, {"type": "text", "text": "What color is the shape?"}]}]))
    for piece in m.generate("def fib(n):", max_tokens=40, stream=True): print(piece, end="")
"""
from __future__ import annotations

import torch

from plinth.constrain import response_format_grammar
from plinth.cpu_share import CpuShare, usable_cpus
from plinth.errors import PlinthError
from plinth.generate import SamplingParams, generate_stream
from plinth.model import Transformer
from plinth.tokenizer import Tokenizer
from plinth.tools import run_tools as tools_loop
from plinth.vision.image_chat import image_prompt, split_images
from plinth.vision.image_sources import ImageLimits


class LoadedModel:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, name: str = "model", load_seconds: float = 0.0,
                 head=None, vision=None, generator=None):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.load_seconds = load_seconds
        self.head = head  # a classification or regression head, for models fine-tuned with task=classify/regress
        self.vision = vision  # an image+text model's image encoder (plinth/vision/multimodal.py), else None
        self.generator = generator  # an image generator (plinth/vision/imagine.py): no tokenizer, no text
        self.decoder = None  # set by `compile()`: generate and chat decode through it
        self._cpu_share = None  # made at the first generation, from the thread count then in force

    def compile(self, build: bool = True) -> "LoadedModel":
        """Decode through compiled steps from now on (plinth/compiled_decode.py): faster one token at
        a time, after compiling on first use (minutes the first time; the programs are kept in
        ~/.cache/plinth/programs and later loads take under a second); prompt-lookup speculation
        checks its guesses in compiled passes too. build=False: only through programs already kept
        (`plinth compile`), decoding eagerly where none is; what `plinth generate` does by default.
        The programs are those tuned on every core this process may use, as `plinth serve`'s; they
        run on any thread count."""
        from plinth.compiled_decode import CompiledDecoder
        self._text_model()
        self.decoder = CompiledDecoder(self.model, len(usable_cpus()), build)
        return self

    def imagine(self, prompt: str, n: int = 1, seed: int = 0, steps: int | None = None,
                guidance: float | None = None) -> list:
        """`n` PIL images for `prompt` ("" = no prompt) from an image generator; `seed` fixes the noise,
        `steps` and `guidance` default to the run's (plinth/vision/imagine.py)."""
        from plinth.vision.imagine import to_image
        if self.generator is None:
            raise PlinthError(f"{self.name} does not generate images; load an image generator (plinth pretrain "
                              "recipes/dit-fashion.yaml)")
        return [to_image(p) for p in self.generator.generate([prompt] * n, seed, steps, guidance)]

    def _text_model(self):
        if self.generator is not None:
            raise PlinthError(f"{self.name} generates images and does not write text; use .imagine(prompt)")

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
        self._text_model()
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        return self._reply(ids, None, stream, options)

    def _reply(self, ids: list[int], embeds, stream: bool, options: dict):
        share = self._cpu_share = self._cpu_share or CpuShare(torch.get_num_threads())
        steps = generate_stream(self.model, self.tokenizer, ids, self._params(**options), embeds=embeds,
                                decoder=self.decoder, cpu_share=share)
        pieces = (step.text for step in steps if step.text)
        return pieces if stream else "".join(pieces)

    def chat(self, messages: list[dict], stream: bool = False, **options):
        """Reply to a conversation rendered through the model's own chat template. A message's
        content is text, or a list of parts: {"type": "text", "text"}, and for an image+text model
        {"type": "image_url", "image_url": {"url"}} or {"type": "image", "image": PIL image, path or
        uint8 array} (plinth/vision/image_chat.py)."""
        self._text_model()
        messages, images = split_images(messages)
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        prompt, pictures = image_prompt(self.tokenizer, self.vision, text, images, ImageLimits(allow_files=True))
        embeds = None
        if pictures is not None:
            with torch.inference_mode():
                embeds = self.model.tok_embeddings(torch.tensor([prompt]))
                embeds[0, pictures.positions] = self.vision(pictures.pixels).flatten(0, 1).to(embeds.dtype)
        return self._reply(prompt, embeds, stream, options)

    def run_tools(self, messages: list[dict], tools: list[dict] | None = None, functions=(), **options) -> list[dict]:
        """Chat while letting the model call Python `functions`; returns the conversation, answer last
        (plinth.tools.run_tools)."""
        return tools_loop(self, messages, tools, functions, **options)

    @torch.inference_mode()
    def logits(self, text: str | list[int]) -> torch.Tensor:
        """Next-token logits (T, V) for every position of `text`, as float32."""
        self._text_model()
        ids = self.tokenizer.encode(text) if isinstance(text, str) else list(text)
        return self.model(torch.tensor([ids]))[0].float()

    @torch.inference_mode()
    def embed(self, texts: list[str] | str) -> torch.Tensor:
        """Mean of the final hidden states per text, L2-normalised: (N, C)."""
        self._text_model()
        texts = [texts] if isinstance(texts, str) else texts
        rows = [self.model.features(torch.tensor([self.tokenizer.encode(t) or [0]]))[0].float().mean(0) for t in texts]
        return torch.nn.functional.normalize(torch.stack(rows), dim=-1)

    def classify(self, inputs) -> list[str]:
        """Labels from the classifier head of a model fine-tuned with task=classify: of texts, or for
        an image model of images (paths, PIL images or uint8 arrays; one or a list)."""
        return self._fine_tuned_head().classify(self, inputs)

    def predict(self, texts: list[str] | str) -> list:
        """The head's answer per text: a label (task=classify) or a number (task=regress)."""
        return self._fine_tuned_head().predict(self, texts)

    def _fine_tuned_head(self):
        if self.head is None:
            raise PlinthError(f"{self.name} has no classification or regression head; train one with `plinth "
                              "finetune recipes/classify-sentiment.yaml` (or regress-sentiment.yaml), or label by "
                              "prompting (plinth.adapt.prompting)")
        return self.head
