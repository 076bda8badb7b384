import pytest
from pydantic import ValidationError

from deployments.openai_api import ChatRequest, CompletionRequest, validation_error_body


def test_completion_defaults_match_openai():
    gen = CompletionRequest.model_validate({"model": "m", "prompt": "hi"}).to_generate("r1")
    assert gen.prompt == "hi" and gen.max_tokens == 16 and gen.temperature == 1.0 and gen.n == 1


def test_token_id_prompt_and_single_item_list():
    assert CompletionRequest.model_validate({"model": "m", "prompt": [1, 2, 3]}).to_generate("r").prompt_token_ids == [1, 2, 3]
    assert CompletionRequest.model_validate({"model": "m", "prompt": ["a"]}).to_generate("r").prompt == "a"
    with pytest.raises(ValueError, match="one prompt per request"):
        CompletionRequest.model_validate({"model": "m", "prompt": ["a", "b"]}).to_generate("r")


def test_chat_content_parts_are_joined_and_max_completion_tokens_wins():
    body = {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
            "max_tokens": 5, "max_completion_tokens": 7, "stop": "x"}
    gen = ChatRequest.model_validate(body).to_generate("r")
    assert gen.messages[0].content == "ab" and gen.max_tokens == 7 and gen.stop == ["x"]


@pytest.mark.parametrize(
    "field,value", [("max_tokens", 0), ("temperature", -0.1), ("n", 0), ("n", 17), ("top_p", 0), ("max_tokens", "x")]
)
def test_out_of_range_values_are_rejected_with_the_field_named(field, value):
    with pytest.raises(ValidationError) as err:
        CompletionRequest.model_validate({"model": "m", "prompt": "hi", field: value})
    body = validation_error_body(err.value)
    assert body["error"]["param"] == field
    assert body["error"]["type"] == "invalid_request_error"
