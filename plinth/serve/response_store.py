"""Stored responses of the Responses API (`store`, the default): what `previous_response_id`
continues and `GET` / `DELETE /v1/responses/{id}` read, kept in the server's memory.

OpenAI keeps responses for 30 days; a server on one machine keeps fewer, for less long: at most
MAX_STORED, each for at most MAX_AGE_SECONDS, the oldest dropped first. A stored response holds its
whole conversation (the items of the responses it continues, its own input, its output) as
references to the same item objects, so a long chain costs a list of pointers per turn, and a
continuation still works after the responses before it were dropped. Images sent as data: URIs are
kept as sent: MAX_STORED bounds that memory too.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

MAX_STORED = 512          # responses kept at once
MAX_AGE_SECONDS = 3600    # how long one is kept after it was made


@dataclass
class Stored:
    body: dict            # the response object, as it was answered
    items: list[dict]     # the conversation so far, as Responses input items, its output last
    at: float = field(default_factory=time.monotonic)


class ResponseStore:
    """Responses by id, within MAX_STORED and MAX_AGE_SECONDS. Used on the event loop's thread only."""

    def __init__(self, most: int = MAX_STORED, seconds: float = MAX_AGE_SECONDS):
        self.most, self.seconds = most, seconds
        self._kept: OrderedDict[str, Stored] = OrderedDict()  # oldest first

    def put(self, body: dict, items: list[dict]):
        self._kept[body["id"]] = Stored(body, items)
        self._expire()

    def get(self, response_id: str) -> Stored | None:
        self._expire()
        return self._kept.get(response_id)

    def delete(self, response_id: str) -> bool:
        self._expire()
        return self._kept.pop(response_id, None) is not None

    def _expire(self):
        oldest = time.monotonic() - self.seconds
        while self._kept and (len(self._kept) > self.most or next(iter(self._kept.values())).at < oldest):
            self._kept.popitem(last=False)
