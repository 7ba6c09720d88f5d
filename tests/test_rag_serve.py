"""Retrieval through the OpenAI-compatible API, driven by the official `openai` client against the
in-process app: a tiny random model answers, the real all-MiniLM-L6-v2 retrieves."""
import httpx
import pytest

from plinth.retrieval.index import Index
from plinth.errors import PlinthError
from plinth.serve.app import create_app
from plinth.serve.state import ServerState
from plinth.engine import Engine
from plinth.serve.retrieval import load_indexes
from tests.conftest import tiny_model

openai = pytest.importorskip("openai")
QUESTION = [{"role": "user", "content": "How long should bread dough be kneaded?"}]


@pytest.fixture(scope="module")
def embedder():
    from plinth.retrieval.embedder import Embedder
    return Embedder.load()


@pytest.fixture(scope="module")
def index_folder(tmp_path_factory, embedder):
    docs = tmp_path_factory.mktemp("docs")
    (docs / "bread.md").write_text("# Bread\n\nKnead bread dough for ten minutes, then let it rise for an hour.\n")
    (docs / "owls.txt").write_text("Owls hunt at night; soft feathers make their flight silent.\n")
    (docs / "tax.md").write_text("# Taxes\n\nFile your tax return before the end of April.\n")
    return Index.build(docs, embedder).save(tmp_path_factory.mktemp("idx") / "idx")


@pytest.fixture
def served(tokenizer, embedder, index_folder):
    engine = Engine(tiny_model(max_seq_len=1024), tokenizer, max_batch=2, max_len=1024)  # room for sources
    engine.start()
    state = ServerState(engine, tokenizer, "tiny", embedder=embedder, indexes=load_indexes({"docs": str(index_folder)}, embedder))
    prompts = []
    submit_all = engine.submit_all  # what the server queues its requests with: record each prompt
    engine.submit_all = lambda jobs, *rest: prompts.extend(tokenizer.decode(job[0]) for job in jobs) or submit_all(jobs, *rest)
    client = openai.AsyncOpenAI(base_url="http://test/v1", api_key="none", max_retries=0,
                                http_client=httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(state))))
    yield client, prompts
    engine.stop()


async def test_a_chat_request_naming_an_index_gets_context_and_sources(served):
    client, prompts = served
    r = await client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=4, seed=1,
                                             extra_body={"retrieval": {"index": "docs", "k": 2}})
    sources = r.model_extra["sources"]
    assert [s["id"] for s in sources] == [1, 2] and sources[0]["source"] == "bread.md"
    assert sources[0]["citation"] == "bread.md:1 (Bread)" and "ten minutes" in sources[0]["text"]
    assert sources[0]["score"] >= sources[1]["score"]
    assert "[1] bread.md:1 (Bread)\n# Bread" in prompts[0] and "Question: How long" in prompts[0]
    plain = await client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=4, seed=1)
    assert "sources" not in plain.model_extra and "ten minutes" not in prompts[1]
    assert r.usage.prompt_tokens > plain.usage.prompt_tokens


async def test_filters_and_streaming(served):
    client, prompts = served
    stream = await client.chat.completions.create(
        model="tiny", messages=QUESTION, max_tokens=3, stream=True,
        extra_body={"retrieval": {"index": "docs", "k": 3, "where": {"source": "*.txt"}}})
    chunks = [chunk async for chunk in stream]
    assert [s["source"] for s in chunks[0].model_extra["sources"]] == ["owls.txt"]  # sources come first
    assert all("sources" not in c.model_extra for c in chunks[1:])
    assert "Owls hunt" in prompts[0] and "Knead" not in prompts[0]


@pytest.mark.parametrize("retrieval, message", [
    ({"index": "nope"}, "unknown index 'nope' in retrieval.index; this server has: docs"),
    ({"index": "docs", "where": {"colour": "red"}}, "cannot filter on colour"),
    ({"index": "docs", "k": 0}, "retrieval.k"),
    ({"index": "docs", "top": 3}, "retrieval.top"),
])
async def test_bad_retrieval_requests_are_400(served, retrieval, message):
    client, _ = served
    with pytest.raises(openai.BadRequestError) as error:
        await client.chat.completions.create(model="tiny", messages=QUESTION, extra_body={"retrieval": retrieval})
    assert message in error.value.response.json()["error"]["message"]


def test_an_index_from_another_embedder_or_without_one_is_refused(embedder, index_folder):
    from plinth.retrieval.embedder import Embedder
    other = Embedder(embedder.config, embedder.tokenizer, "other-encoder", embedder.max_tokens, lambda: embedder.model)
    with pytest.raises(PlinthError, match="built with the embedder 'all-minilm-l6-v2', but the server embeds with "
                                          "'other-encoder': start it with --embedding-model all-minilm-l6-v2"):
        load_indexes({"docs": str(index_folder)}, other)
    with pytest.raises(PlinthError, match="needs an embedding model"):
        load_indexes({"docs": str(index_folder)}, None)
    with pytest.raises(PlinthError, match="NAME=FOLDER"):
        load_indexes({"": str(index_folder)}, embedder)
