"""The HTTP server around the engine (`plinth serve`): `app` builds the FastAPI app (auth, body
limits, health, metrics, graceful drain) and runs it; `state` is what every route shares;
`openai_api` holds the OpenAI-compatible routes and `images_api` an image generator's, with their
request bodies and error shape in `schemas` and what /openapi.json documents of their responses in
`openapi`, and the extras they call on: `chat_tools` (tools and structured output), `echo`
(prompt logprobs for `echo`), `retrieval` (passages from a served index); `responses` serves
OpenAI's Responses API on the chat route's path, its bodies in `responses_schemas` and its stored
responses in `response_store`; `ollama_api` serves Ollama's API under /api/ from the same engine,
its bodies in `ollama_schemas` and its model listings in `ollama_models`; `metrics` renders
/metrics; `static/` is the chat page served at `/`. Handlers only queue work and await it: the
engine (`plinth.engine`) runs the model on its own thread.
"""
