"""schemathesis hooks for tests/test_schemathesis.py (loaded through SCHEMATHESIS_HOOKS).

`positive_data_acceptance` expects any request the schema allows to be accepted. One rule no JSON
Schema can state: the prompt's tokens plus `max_tokens` must fit the model's context, which the
server answers, as OpenAI does, with a 400 coded `context_length_exceeded`. This check is that one,
with that single exception; every other refusal of a schema-valid request still fails it."""
import schemathesis
from schemathesis.specs.openapi.checks import positive_data_acceptance


@schemathesis.check
def positive_data_acceptance_within_context(ctx, response, case):
    if response.status_code == 400 and error_code(response) == "context_length_exceeded":
        return None
    return positive_data_acceptance(ctx, response, case)


def error_code(response) -> str | None:
    try:
        return response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None
