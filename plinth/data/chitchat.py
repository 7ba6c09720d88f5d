"""Human–human conversations of the chitchat-dataset (PyPI `chitchat-dataset`, MIT; 7,168 chats):
chat fine-tuning data (plinth/adapt/sft.py) and, as dialogue text, a pretraining source."""
from __future__ import annotations

import json

from plinth.errors import PlinthError
from plinth.hub import package_dir


def chitchat_conversations() -> list[list[dict]]:
    """The chitchat-dataset (PyPI, MIT): human–human chats; the speaker who opens is the user. A
    speaker's consecutive messages become one turn."""
    folder = package_dir("chitchat_dataset")
    if folder is None:
        raise PlinthError("the chitchat dataset is not installed; run `pip install --no-deps chitchat-dataset`")
    data = json.loads((folder / "dataset.json").read_text())
    conversations = []
    for conversation in data.values():
        turns = [" ".join(u["text"] for u in group) for group in conversation["messages"]]
        messages = [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]
        if len(messages) >= 2:
            conversations.append(messages)
    return conversations
