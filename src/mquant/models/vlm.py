"""A loaded multimodal model: the HF module plus what it needs to turn samples into inputs."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedModel

from mquant.errors import MquantError
from mquant.models.registry import family_for_config
from mquant.models.spec import ModelFamily
from mquant.samples import Sample


@dataclass
class VLM:
    model: PreTrainedModel
    tokenizer: Any
    image_processor: Any
    family: ModelFamily
    path: str
    # Set on quantized models: the recipe and report they were made with.
    quant_info: dict | None = field(default=None)
    # How the chat template takes image content, found on first use (see `_render`).
    _template_mode: str | None = field(default=None, repr=False)

    @property
    def config(self):
        return self.model.config

    @property
    def image_token_id(self) -> int:
        return self.family.image_token_id(self.config)

    # -- inputs -----------------------------------------------------------------------------------
    def prompt_ids(self, sample: Sample, with_answer: bool) -> list[int]:
        messages = [{"role": "user", "content": sample.content()}]
        if with_answer:
            if not sample.answers:
                raise MquantError(f"sample {sample.id} has no answer to teacher-force")
            messages.append({"role": "assistant", "content": sample.answers[0]})
        text = self._apply_chat_template(messages, add_generation_prompt=not with_answer)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _apply_chat_template(self, messages: list[dict], add_generation_prompt: bool) -> str:
        if self._template_mode is None:
            self._template_mode = self._working_template_mode(messages)
        return self._render(self._template_mode, messages, add_generation_prompt)

    def _render(self, mode: str, messages: list[dict], add_generation_prompt: bool) -> str:
        """`content`: the checkpoint's template on image+text content; `string`: the same template on
        the text with the family's image prompt in place of each image; `family`: mquant's template."""
        template = self.family.chat.default_chat_template if mode == "family" else self.tokenizer.chat_template
        if mode == "string":
            messages = [{**m, "content": self._flatten(m["content"])} for m in messages]
        return self.tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def _working_template_mode(self, messages: list[dict]) -> str:
        """The first mode that renders: a template that only takes string content (SmolLM2's, many
        text-only LLMs') gets the text; one that cannot render either is replaced. Both warn."""
        import jinja2

        if not self.tokenizer.chat_template:
            return "family"
        for mode in ("content", "string"):
            try:
                self._render(mode, messages, add_generation_prompt=True)
            except (TypeError, jinja2.TemplateError):
                continue
            if mode == "string":
                warnings.warn(f"{self.path}: the chat template does not take image content; images are given "
                              f"to it as {self.family.chat.image_prompt!r} inside the message text")
            return mode
        warnings.warn(f"{self.path}: the chat template cannot render image+text messages; using mquant's "
                      f"{self.family.name} template instead")
        return "family"

    def _flatten(self, content) -> str:
        if isinstance(content, str):
            return content
        return "".join(self.family.chat.image_prompt if item["type"] == "image" else item["text"] for item in content)

    def encode(self, samples: list[Sample], with_answer: bool = False) -> dict[str, torch.Tensor]:
        """Model inputs for a batch: chat template, image tensors, one placeholder per visual token,
        left padding (so that generation continues every row at the same index)."""
        rows, image_tensors = [], []
        for sample in samples:
            ids = self.prompt_ids(sample, with_answer)
            counts: list[int] = []
            if sample.images:
                tensors, counts = self.family.images.process(self.image_processor, sample.images, self.config)
                image_tensors.append(tensors)
            rows.append(self._expand_placeholders(ids, counts, sample.id))
        length = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, length - len(r):] = torch.tensor(r)
            attention_mask[i, length - len(r):] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        for key in image_tensors[0] if image_tensors else ():
            batch[key] = torch.cat([t[key] for t in image_tensors])
        batch.update(self.family.extra_text_inputs(input_ids, self.config))
        return {key: value.to(self.model.device) for key, value in batch.items()}

    def _expand_placeholders(self, ids: list[int], counts: list[int], sample_id: str) -> list[int]:
        token = self.image_token_id
        positions = [i for i, t in enumerate(ids) if t == token]
        if len(positions) != len(counts):
            raise MquantError(f"sample {sample_id}: prompt has {len(positions)} image placeholders "
                              f"but {len(counts)} images")
        out: list[int] = []
        start = 0
        for pos, n in zip(positions, counts):
            out += ids[start:pos] + [token] * n
            start = pos + 1
        return out + ids[start:]

    # -- running ----------------------------------------------------------------------------------
    @torch.no_grad()
    def logits(self, sample: Sample, with_answer: bool = False) -> torch.Tensor:
        return self.model(**self.encode([sample], with_answer)).logits[0].float()

    @torch.no_grad()
    def generate(self, samples: list[Sample], max_new_tokens: int = 16) -> list[str]:
        batch = self.encode(samples)
        out = self.model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
        )
        new = out[:, batch["input_ids"].shape[1]:]
        return [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]


def read_config(path: str | Path) -> dict:
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise MquantError(f"{path}: not a model directory (no config.json)")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise MquantError(f"{config_file}: invalid JSON ({exc})") from None


def load_pretrained(path: str | Path, dtype: torch.dtype = torch.float32) -> VLM:
    """Load a floating-point Hugging Face checkpoint of a supported family (safetensors only)."""
    path = str(path)
    family = family_for_config(read_config(path))
    if not any(Path(path).glob("*.safetensors")):
        raise MquantError(f"{path}: no .safetensors weights (pickled checkpoints are not loaded)")
    model = family.model_class.from_pretrained(path, dtype=dtype, use_safetensors=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    processor = family.images.load_processor(path)
    return VLM(model, tokenizer, processor, family, path)
