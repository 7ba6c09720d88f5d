"""Retrieval: reading files, token chunks with source positions, the on-disk index, filters, and
prompts that fit the context window. Small generated documents and the real all-MiniLM-L6-v2."""
import json

import numpy as np
import pytest

from plinth.retrieval.chunking import chunk_documents, plain_tokenizer
from plinth.data.documents import Document, load_folder
from plinth.retrieval.index import Index
from plinth.retrieval.rag import with_sources
from plinth.errors import PlinthError

MARKDOWN = """# Garden guide

Intro line about this guide.

## Tomatoes

Tomatoes need six hours of sun and deep watering twice a week.
Stake them early so the stems do not break.

## Roses

Prune roses in late winter, just above an outward-facing bud.
"""

HTML = """<html><head><title>Kitchen notes</title><style>p {color: red}</style></head><body>
<div role="navigation"><a href="/">Home</a> Navigation links here</div>
<h1>Bread<a class="headerlink" href="#bread">¶</a></h1>
<p>Knead the dough for ten minutes,
   then let it rise   for an hour.</p>
<script>var ignored = "script text";</script>
<h2>Soup</h2><ul><li>Simmer the stock.</li><li>Season &amp; taste.</li></ul>
<pre>keep
   this   layout</pre>
</body></html>"""

PYTHON = '''"""Billing helpers."""


def total(items):
    return sum(item.price for item in items)


class Invoice:
    @property
    def due(self):
        return 30
'''


def tiny_pdf(text: str) -> bytes:
    """A one-page PDF drawing `text` in Helvetica, with a correct cross-reference table."""
    content = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
               b"/Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream",
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


@pytest.fixture(scope="module")
def docs_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("docs")
    (folder / "sub").mkdir(parents=True)
    (folder / "garden.md").write_text(MARKDOWN)
    (folder / "kitchen.html").write_text(HTML)
    (folder / "sub" / "billing.py").write_text(PYTHON)
    (folder / "sub" / "birds.txt").write_text("Owls hunt at night. Their soft feathers make their flight silent.\n")
    (folder / "image.png").write_bytes(b"\x89PNG")  # not a document: skipped
    (folder / ".hidden.txt").write_text("never indexed")
    return folder


@pytest.fixture(scope="module")
def embedder():
    from plinth.retrieval.embedder import Embedder
    return Embedder.load()


@pytest.fixture(scope="module")
def index(docs_folder, embedder):
    return Index.build(docs_folder, embedder, chunk_tokens=24, overlap=6)


def test_each_kind_is_read_with_its_sections(docs_folder):
    docs = {d.source: d for d in load_folder(docs_folder)}
    assert sorted(docs) == ["garden.md", "kitchen.html", "sub/billing.py", "sub/birds.txt"]
    md = docs["garden.md"]
    assert md.kind == "markdown" and md.text == MARKDOWN and md.title == "Garden guide"
    assert md.section_at(MARKDOWN.index("Stake")) == "Tomatoes" and md.section_at(0) == "Garden guide"
    html = docs["kitchen.html"]
    assert html.title == "Bread"  # the first <h1>, the page's own name, over <title>
    assert "Knead the dough for ten minutes, then let it rise for an hour." in html.text  # whitespace collapsed
    assert "keep\n   this   layout" in html.text  # but not inside <pre>
    assert "Season & taste." in html.text
    for hidden in ("Navigation links", "color: red", "script text", "¶", "Kitchen notes"):
        assert hidden not in html.text
    assert [h for _, h in html.sections] == ["Bread", "Soup"]
    assert html.section_at(html.text.index("Simmer")) == "Soup"
    py = docs["sub/billing.py"]
    assert py.title == "Billing helpers." and py.section_at(PYTHON.index("return 30")) == "due"
    assert py.line_at(PYTHON.index("class Invoice")) == 8
    assert load_folder(docs_folder, exclude=["sub/*"]) and all(not d.source.startswith("sub/")
                                                             for d in load_folder(docs_folder, exclude=["sub/*"]))


def test_pdf_text_is_read_page_by_page(tmp_path):
    pytest.importorskip("pypdf")
    (tmp_path / "manual.pdf").write_bytes(tiny_pdf("Reset the router by holding the button"))
    (doc,) = load_folder(tmp_path)
    assert doc.kind == "pdf" and "Reset the router by holding the button" in doc.text
    assert doc.section_at(0) == "page 1"
    (tmp_path / "manual.pdf").write_bytes(b"%PDF-1.4 broken")
    with pytest.raises(PlinthError, match="not a readable PDF"):
        load_folder(tmp_path)


def test_chunks_are_token_windows_with_overlap_and_exact_positions(embedder):
    text = "\n".join(f"Line {i} says something about topic number {i}." for i in range(60))
    doc = Document("notes.txt", "text", "notes", text)
    chunks = chunk_documents([doc], embedder.tokenizer, size=40, overlap=10)
    plain = plain_tokenizer(embedder.tokenizer)
    assert len(chunks) > 5
    for c in chunks:
        assert c.text == text[c.start:c.end] and c.line == text.count("\n", 0, c.start) + 1
        assert len(plain.encode(c.text, add_special_tokens=False).ids) <= 40
    for before, after in zip(chunks, chunks[1:]):
        assert after.start < before.end  # consecutive chunks overlap: nothing falls between them
    assert chunks[0].start == 0 and chunks[-1].end == len(text)
    assert sum(c.text.endswith(".") for c in chunks) >= len(chunks) - 1  # cut at line ends where possible
    with pytest.raises(PlinthError, match="overlap"):
        chunk_documents([doc], embedder.tokenizer, size=40, overlap=30)


def test_search_finds_the_answer_and_dense_mode_matches_brute_force(index, embedder):
    hits = index.search(embedder, "When should I prune my roses?", k=3)
    assert hits[0].chunk.source == "garden.md" and "Prune roses" in hits[0].chunk.text
    assert index.search(embedder, "Which birds fly silently at night?", k=1)[0].chunk.source == "sub/birds.txt"
    query = embedder.embed("bread dough").numpy()[0]
    similarity = [float(np.dot(v, query)) for v in index.vectors]
    reference = sorted(range(len(index)), key=lambda i: -similarity[i])
    hits = index.search(embedder, "bread dough", k=len(index), mode="dense", distinct=False)
    assert [h.chunk for h in hits] == [index.chunks[i] for i in reference]
    assert [h.score for h in hits] == pytest.approx([similarity[i] for i in reference], abs=1e-5)


def test_hybrid_search_fuses_word_and_meaning_rankings(index, embedder):
    lexical = index.search(embedder, "Invoice due", k=len(index), mode="lexical", distinct=False)
    assert lexical[0].chunk.source == "sub/billing.py"  # the only chunk with both words
    dense = index.search(embedder, "Invoice due", k=len(index), mode="dense", distinct=False)
    hybrid = index.search(embedder, "Invoice due", k=len(index), distinct=False)
    position = {mode: [h.chunk for h in hits].index(lexical[0].chunk) for mode, hits in
                [("dense", dense), ("hybrid", hybrid)]}
    assert position["hybrid"] <= position["dense"]  # the exact words lift it
    assert sorted(h.chunk.start for h in hybrid) == sorted(c.start for c in index.chunks)  # a ranking of all
    with pytest.raises(PlinthError, match="unknown search mode 'fuzzy'; use one of hybrid, dense, lexical"):
        index.search(embedder, "x", mode="fuzzy")


def test_hits_do_not_repeat_text_of_better_hits(index, embedder):
    def overlap(a, b):
        return a.source == b.source and a.start < b.end and b.start < a.end

    every = [h.chunk for h in index.search(embedder, "tomatoes and roses", k=len(index), distinct=False)]
    kept = [h.chunk for h in index.search(embedder, "tomatoes and roses", k=len(index))]
    assert any(overlap(a, b) for a, b in zip(every, every[1:]))  # the windows of garden.md overlap
    assert not any(overlap(a, b) for i, a in enumerate(kept) for b in kept[:i])
    assert kept == [c for c in every if c in kept]  # in the same order
    for chunk in every:  # each chunk left out repeats a better one
        if chunk not in kept:
            assert any(overlap(chunk, better) for better in every[:every.index(chunk)] if better in kept)
    assert kept[:2] == [h.chunk for h in index.search(embedder, "tomatoes and roses", k=2)]


def test_filters_restrict_the_candidates(index, embedder):
    hits = index.search(embedder, "When should I prune my roses?", k=3, where={"source": "sub/*"})
    assert hits and all(h.chunk.source.startswith("sub/") for h in hits)
    hits = index.search(embedder, "roses", k=10, where={"kind": ["python", "html"]})
    assert {h.chunk.kind for h in hits} <= {"python", "html"}
    assert index.search(embedder, "roses", where={"source": "nothing/*"}) == []
    with pytest.raises(PlinthError, match="cannot filter on colour: filterable fields are source, kind"):
        index.search(embedder, "roses", where={"colour": "red"})


def test_index_round_trips_through_disk_atomically(index, embedder, tmp_path):
    out = index.save(tmp_path / "idx")
    assert [p.name for p in tmp_path.iterdir()] == ["idx"]  # no temporary folder left
    loaded = Index.load(out)
    assert loaded.chunks == index.chunks and np.array_equal(loaded.vectors, index.vectors)
    assert json.loads((out / "index.json").read_text())["embedder"] == "all-minilm-l6-v2"
    assert loaded.search(embedder, "tomato watering", k=2) == index.search(embedder, "tomato watering", k=2)
    Index(index.vectors[:1], index.chunks[:1], index.info).save(out)  # replacing an index is atomic too
    assert len(Index.load(out)) == 1
    (tmp_path / "mine").mkdir()
    with pytest.raises(PlinthError, match="not a plinth index"):
        index.save(tmp_path / "mine")  # never overwrites a folder that is not an index


def test_bad_indexes_and_queries_are_clear_errors(index, embedder, tmp_path):
    from plinth.retrieval.embedder import Embedder
    other = Embedder(embedder.config, embedder.tokenizer, "some-other-encoder", embedder.max_tokens, lambda: embedder.model)
    with pytest.raises(PlinthError, match="built with the embedder 'all-minilm-l6-v2', not 'some-other-encoder'"):
        index.search(other, "roses")
    (tmp_path / "empty").mkdir()
    empty = Index.build(tmp_path / "empty", embedder)
    Index.load(empty.save(tmp_path / "empty-idx"))
    with pytest.raises(PlinthError, match="holds no chunks"):
        Index.load(tmp_path / "empty-idx").search(embedder, "anything")
    with pytest.raises(PlinthError, match="not a plinth index"):
        Index.load(tmp_path / "empty")
    with pytest.raises(PlinthError, match="not a file or folder"):
        Index.build(tmp_path / "missing", embedder)


def test_prompt_holds_the_best_sources_that_fit_and_cites_them(index, embedder, tokenizer):
    hits = index.search(embedder, "When should I prune my roses?", k=4)
    question = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "When should I prune my roses?"}]

    def prompt_tokens(messages):
        return len(tokenizer.encode(tokenizer.apply_chat_template(messages), add_bos=False))

    messages, sources = with_sources(question, hits, tokenizer, 10_000)
    assert [s["id"] for s in sources] == [1, 2, 3, 4] and sources[0]["source"] == "garden.md"
    content = messages[-1]["content"]
    assert messages[0] == question[0] and content.endswith("Question: When should I prune my roses?")
    assert "[1] garden.md:" in content and hits[0].chunk.text.strip() in content
    budget = prompt_tokens(with_sources(question, hits[:2], tokenizer, 10_000)[0])
    messages, sources = with_sources(question, hits, tokenizer, budget)
    assert prompt_tokens(messages) <= budget and len(sources) == 2
    messages, sources = with_sources(question, hits, tokenizer, prompt_tokens(question) + 5)
    assert sources == [] and messages == question  # no room: the question alone
    with pytest.raises(PlinthError, match="no room"):
        with_sources(question, hits, tokenizer, 10)


def test_hybrid_scores_are_a_weighted_sum_of_scaled_scores():
    from plinth.retrieval.index import DENSE_WEIGHT, fuse
    fused = fuse(np.array([0.9, 0.8, 0.1]), np.array([0.0, 5.0, 0.0]))  # scaled: [1, 7/8, 0] and [0, 1, 0]
    assert fused == pytest.approx([DENSE_WEIGHT, DENSE_WEIGHT * 7 / 8 + (1 - DENSE_WEIGHT), 0.0])
    assert list(np.argsort(-fused)) == [1, 0, 2]  # second by meaning, first by words: first overall
    assert fuse(np.array([0.5, 0.5]), np.zeros(2)) == pytest.approx([0.0, 0.0])  # no spread, no say


def test_lexical_search_matches_other_forms_of_a_word(index, embedder):
    (hit,) = index.search(embedder, "pruning rose", k=1, mode="lexical")  # the text says "Prune roses"
    assert hit.chunk.source == "garden.md" and "Prune roses" in hit.chunk.text
    assert index.lexical_scores("pruning rose").max() > 0


def test_ask_answers_from_the_best_sources_that_fit(index, embedder, tokenizer):
    from plinth.retrieval.rag import ask
    from plinth.loaded import LoadedModel
    from tests.conftest import tiny_model
    model = LoadedModel(tiny_model(max_seq_len=1024), tokenizer)
    reply = ask(model, index, embedder, "When should I prune my roses?", k=3, max_tokens=4, temperature=0)
    assert isinstance(reply.text, str) and [s["id"] for s in reply.sources] == [1, 2, 3]
    assert reply.sources[0]["citation"].startswith("garden.md:")
    streamed = ask(model, index, embedder, "When should I prune my roses?", k=3, max_tokens=4, temperature=0,
                   stream=True, where={"kind": "text"})
    assert "".join(streamed.text) and [s["source"] for s in streamed.sources] == ["sub/birds.txt"]
    small = LoadedModel(tiny_model(max_seq_len=300), tokenizer)  # the window leaves room for fewer sources
    assert len(ask(small, index, embedder, "When should I prune my roses?", k=3, max_tokens=4).sources) < 3


def test_html_without_a_heading_takes_its_title_from_title(tmp_path):
    (tmp_path / "page.html").write_text("<html><head><title> Plain   page </title></head><body><p>Hi</p></body></html>")
    (doc,) = load_folder(tmp_path)
    assert (doc.title, doc.text.strip(), doc.sections) == ("Plain page", "Hi", [])



def test_html_section_offsets_point_at_their_headings(tmp_path):
    marks = "".join(f"<h2>Part {i}<a class='headerlink'>¶</a></h2><p>Text {i} ¶ here.</p>" for i in range(30))
    (tmp_path / "long.html").write_text(f"<html><body><h1>Long<a>¶</a></h1>{marks}</body></html>")
    (doc,) = load_folder(tmp_path)
    assert "¶" not in doc.text and len(doc.sections) == 31
    for start, heading in doc.sections:  # Sphinx's ¶ marks go before offsets are counted, so none drifts
        assert doc.text[start:].startswith(heading)
    assert doc.section_at(doc.text.index("Text 29")) == "Part 29"


def test_the_encoders_weights_are_read_at_its_first_embedding_not_at_load():
    """A server loads its embedder at start; one never asked for embeddings never holds the weights."""
    from plinth.retrieval.embedder import Embedder
    embedder = Embedder.load()
    assert not embedder.read and embedder.dimensions == 384 and embedder.vocab_size == 30522
    outline = embedder.outline()  # what /api/tags counts, without reading
    assert not embedder.read and next(outline.parameters()).device.type == "meta"
    assert embedder.embed("A cat sits.").shape == (1, 384) and embedder.read
    assert [(n, p.shape, p.dtype) for n, p in outline.named_parameters()] == \
        [(n, p.shape, p.dtype) for n, p in embedder.outline().named_parameters()]
