"""Instruction data: loading (alpaca / sharegpt, JSON or JSONL), a byte-level tokenizer, tokenisation with the
prompt masked out of the loss, and deterministic batches (batch i is a pure function of (seed, i), which makes
resuming exact)."""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

IGNORE_INDEX = -100
DEFAULT_DATA = os.path.join(os.path.dirname(__file__), "data", "tiny_instruct.jsonl")

Message = Dict[str, str]  # {"role": "system" | "user" | "assistant", "content": str}


# ---------------------------------------------------------------- tokenizer

class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; then <pad>, <bos>, <eos>. Needs no download, no vocabulary file."""

    pad_token_id, bos_token_id, eos_token_id = 256, 257, 258
    vocab_size = 259
    eos_token = "<eos>"
    chat_template = None
    name_or_path = "ktmoe-byte-tokenizer"

    def encode(self, text: str, add_special_tokens: bool = False) -> List[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id] + ids if add_special_tokens else ids

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


# ---------------------------------------------------------------- files

_ROLE = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
         "bot": "assistant", "system": "system"}


def _read_records(path: str) -> List[dict]:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    stripped = text.lstrip()
    if path.endswith(".jsonl") or (stripped and stripped[0] == "{" and "\n{" in stripped):
        out = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        return out
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON or JSONL ({e.msg} at line {e.lineno})") from None
    if isinstance(data, dict):
        for key in ("data", "train", "examples"):
            if isinstance(data.get(key), list):
                return data[key]
        raise ValueError(f"{path}: a JSON object; expected a list of examples")
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of examples")
    return data


def record_to_messages(rec: dict, where: str = "") -> List[Message]:
    """One alpaca ({instruction, input?, output, system?}) or sharegpt ({conversations: [{from, value}]} or
    {messages: [{role, content}]}) record -> a list of messages."""
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if "instruction" in rec and "output" in rec:
        prompt = str(rec["instruction"])
        if rec.get("input"):
            prompt = f"{prompt}\n\n{rec['input']}"
        msgs = [{"role": "system", "content": str(rec["system"])}] if rec.get("system") else []
        return msgs + [{"role": "user", "content": prompt}, {"role": "assistant", "content": str(rec["output"])}]
    conv = rec.get("conversations", rec.get("messages"))
    if isinstance(conv, list):
        msgs = []
        for turn in conv:
            role = _ROLE.get(str(turn.get("from", turn.get("role", ""))).lower())
            content = turn.get("value", turn.get("content"))
            if role is None or content is None:
                raise ValueError(f"{where}: a turn needs from/role (human, gpt, user, assistant, system) and "
                                 f"value/content, got {sorted(turn)}")
            msgs.append({"role": role, "content": str(content)})
        if not any(m["role"] == "assistant" for m in msgs):
            raise ValueError(f"{where}: conversation without an assistant turn")
        return msgs
    raise ValueError(f"{where}: neither alpaca (instruction/output) nor sharegpt (conversations/messages); keys "
                     f"{sorted(rec)}")


def load_conversations(path: str) -> List[List[Message]]:
    recs = _read_records(path)
    if not recs:
        raise ValueError(f"{path}: no examples")
    return [record_to_messages(r, f"{path}: example {i}") for i, r in enumerate(recs)]


# ---------------------------------------------------------------- tokenisation

PLAIN_TEMPLATE = ("### Instruction:\n", "\n\n### Response:\n")  # used when the tokenizer has no chat template


def _plain_segments(msgs: List[Message], eos: str) -> List[Tuple[str, bool]]:
    """(text, trained) pieces of a conversation in the plain template."""
    segs: List[Tuple[str, bool]] = []
    system = "".join(m["content"] + "\n\n" for m in msgs if m["role"] == "system")
    pending = system
    for m in msgs:
        if m["role"] == "user":
            pending += PLAIN_TEMPLATE[0] + m["content"] + PLAIN_TEMPLATE[1]
        elif m["role"] == "assistant":
            segs.append((pending, False))
            segs.append((m["content"] + eos, True))
            pending = "\n\n"
    return segs


def _chat_ids(tokenizer, msgs: List[Message], generation_prompt: bool) -> List[int]:
    out = tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=generation_prompt)
    if isinstance(out, Mapping):  # transformers 5 returns a BatchEncoding
        out = out["input_ids"]
    return [int(i) for i in out]


def tokenize_conversation(tokenizer, msgs: List[Message], max_len: int) -> Optional[Tuple[List[int], List[int]]]:
    """(input_ids, labels): only assistant tokens are trained (labels IGNORE_INDEX elsewhere); truncated to max_len;
    None if nothing trainable is left."""
    ids: List[int] = []
    labels: List[int] = []
    if getattr(tokenizer, "chat_template", None):
        # incremental: each assistant turn's tokens are the difference between consecutive renderings
        prev: List[int] = []
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            prompt = _chat_ids(tokenizer, msgs[:i], True)
            full = _chat_ids(tokenizer, msgs[: i + 1], False)
            if prompt[: len(prev)] != prev or full[: len(prompt)] != prompt:
                raise ValueError("the tokenizer's chat template is not prefix-consistent; use a tokenizer without "
                                 "a chat template or single-turn data")
            ids += prompt[len(prev):]
            labels += [IGNORE_INDEX] * (len(prompt) - len(prev))
            ids += full[len(prompt):]
            labels += full[len(prompt):]
            prev = full
    else:
        eos = getattr(tokenizer, "eos_token", None) or ""
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is not None:
            ids, labels = [bos], [IGNORE_INDEX]
        for text, trained in _plain_segments(msgs, eos):
            t = tokenizer.encode(text, add_special_tokens=False)
            if trained and isinstance(tokenizer, ByteTokenizer):  # eos is one special id, not 5 bytes
                t = tokenizer.encode(text[: -len(eos)]) + [tokenizer.eos_token_id]
            ids += t
            labels += t if trained else [IGNORE_INDEX] * len(t)
    ids, labels = ids[:max_len], labels[:max_len]
    if all(x == IGNORE_INDEX for x in labels[1:]):
        return None
    return ids, labels


@dataclass
class Dataset:
    examples: List[Tuple[List[int], List[int]]]
    pad_id: int
    dropped: int = 0

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def num_tokens(self) -> int:
        return sum(len(i) for i, _ in self.examples)


def build_dataset(tokenizer, conversations: List[List[Message]], max_len: int) -> Dataset:
    out, dropped = [], 0
    for msgs in conversations:
        t = tokenize_conversation(tokenizer, msgs, max_len)
        if t is None:
            dropped += 1
        else:
            out.append(t)
    if not out:
        raise ValueError(f"no example has a trainable (assistant) token within max_seq_len={max_len}")
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    if isinstance(pad, (list, tuple)):
        pad = pad[0]
    return Dataset(out, int(pad or 0), dropped)


class Batches:
    """batch(step) -> dict(input_ids, attention_mask, labels) [B, L], a pure function of (seed, step): the data
    order is a fresh permutation per epoch, batches never straddle the shuffle."""

    def __init__(self, data: Dataset, batch_size: int, seed: int):
        self.data, self.bs, self.seed = data, batch_size, seed
        self._perm_cache: Dict[int, List[int]] = {}

    def _perm(self, epoch: int) -> List[int]:
        if epoch not in self._perm_cache:
            idx = list(range(len(self.data)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(idx)
            self._perm_cache = {epoch: idx}
        return self._perm_cache[epoch]

    @property
    def steps_per_epoch(self) -> int:
        return max(1, len(self.data) // self.bs)

    def indices(self, step: int) -> List[int]:
        n = len(self.data)
        if self.bs >= n:
            return self._perm(step)[:n]
        epoch, i = divmod(step, self.steps_per_epoch)
        return self._perm(epoch)[i * self.bs:(i + 1) * self.bs]

    def batch(self, step: int) -> Dict[str, torch.Tensor]:
        rows = [self.data.examples[i] for i in self.indices(step)]
        L = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), L), self.data.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), L), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), L), dtype=torch.long)
        for r, (ids, lab) in enumerate(rows):
            input_ids[r, : len(ids)] = torch.tensor(ids)
            labels[r, : len(lab)] = torch.tensor(lab)
            mask[r, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


# ---------------------------------------------------------------- the shipped dataset

_WORDS = ("apple banana cherry dragon eagle forest garden harbor island jungle kettle lemon mountain needle ocean "
          "pepper quartz river silver tiger umbrella violet window yellow zebra anchor bridge candle desert engine "
          "falcon glacier hammer jacket ladder marble nickel orange pencil rocket saddle tunnel velvet walnut copper "
          "dolphin feather lantern meadow planet").split()
_CAPITALS = (("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Egypt", "Cairo"),
             ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Chile", "Santiago"), ("Canada", "Ottawa"), ("Norway", "Oslo"),
             ("Greece", "Athens"), ("Poland", "Warsaw"), ("Cuba", "Havana"), ("India", "New Delhi"),
             ("Germany", "Berlin"), ("Ireland", "Dublin"))


def generate_tiny_instructions(n: int = 400, seed: int = 0) -> List[dict]:
    """The shipped tiny alpaca dataset (src/ktmoe/train/data/tiny_instruct.jsonl is exactly this): short tasks a
    tiny byte-level model can learn in a minute (reverse, uppercase, add, capitals, count, sort, repeat)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = i % 7
        w = rng.choice(_WORDS)
        if kind == 0:
            rec = {"instruction": f"Reverse the word: {w}", "output": w[::-1]}
        elif kind == 1:
            rec = {"instruction": "Write the word in capital letters.", "input": w, "output": w.upper()}
        elif kind == 2:
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            rec = {"instruction": f"What is {a} plus {b}?", "output": f"{a} plus {b} is {a + b}."}
        elif kind == 3:
            c, cap = rng.choice(_CAPITALS)
            rec = {"instruction": f"What is the capital of {c}?", "output": f"The capital of {c} is {cap}."}
        elif kind == 4:
            rec = {"instruction": f"How many letters are in the word {w}?", "output": f"{w} has {len(w)} letters."}
        elif kind == 5:
            rec = {"instruction": "Sort the letters alphabetically.", "input": w, "output": "".join(sorted(w))}
        else:
            k = rng.randint(2, 3)
            rec = {"instruction": f"Repeat the word {w} {k} times.", "output": " ".join([w] * k)}
        out.append(rec)
    return out


def write_tiny_instructions(path: str = DEFAULT_DATA) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for rec in generate_tiny_instructions():
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
