"""The official `openai` client against `paligemma serve`'s /v1/chat/completions."""

from __future__ import annotations

import pytest

from conftest import REPO, data_url

IMAGE = REPO / "tests" / "data" / "images" / "chelsea.png"
PROMPT = "caption en"
MAX_TOKENS = 16


def client(server, api_key: str | None = None):
    try:
        import openai
    except ImportError:
        pytest.fail("the openai package is missing: run `bash .ci/setup` (it installs tests/python/requirements.txt)", pytrace=False)
    # No retries: a failure should show at once, not after the client's back-off.
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=api_key or server.api_key, max_retries=0, timeout=60)


def user_message() -> list[dict]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_url(IMAGE)}},
                {"type": "text", "text": PROMPT},
            ],
        }
    ]


def test_chat_completion_answers_as_generate_does(server):
    expected = server.generate(IMAGE, PROMPT, MAX_TOKENS)

    completion = client(server).chat.completions.create(model="paligemma", messages=user_message(), max_tokens=MAX_TOKENS)

    assert completion.object == "chat.completion"
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected["text"]
    assert choice.finish_reason == ("stop" if expected["finished"] else "length")
    extra = completion.model_extra["paligemma"]
    assert extra["image_size"] == expected["image_size"]
    assert extra["detections"] == expected["detections"]


def test_streamed_chat_completion_adds_up_to_the_same_text(server):
    expected = server.generate(IMAGE, PROMPT, MAX_TOKENS)

    stream = client(server).chat.completions.create(model="paligemma", messages=user_message(), max_tokens=MAX_TOKENS, stream=True)
    chunks = list(stream)

    assert chunks and all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    with_choice = [chunk.choices[0] for chunk in chunks if chunk.choices]
    assert "".join(choice.delta.content or "" for choice in with_choice) == expected["text"]
    # The last chunk carries the finish reason, and only it.
    assert [choice.finish_reason for choice in with_choice] == [None] * (len(with_choice) - 1) + [
        "stop" if expected["finished"] else "length"
    ]


def test_wrong_api_key_is_an_authentication_error(server):
    import openai

    with pytest.raises(openai.AuthenticationError) as raised:
        client(server, api_key="not-the-key").chat.completions.create(model="paligemma", messages=user_message(), max_tokens=MAX_TOKENS)
    assert raised.value.status_code == 401


def test_fields_clients_send_at_neutral_values_are_accepted_and_others_named(server):
    import openai

    expected = server.generate(IMAGE, PROMPT, MAX_TOKENS)
    neutral = client(server).chat.completions.create(
        model="paligemma",
        messages=user_message(),
        max_tokens=MAX_TOKENS,
        stop=None,
        frequency_penalty=0,
        presence_penalty=0,
        logprobs=False,
        n=1,
        temperature=0,
        response_format={"type": "text"},
    )
    assert neutral.choices[0].message.content == expected["text"]
    with pytest.raises(openai.BadRequestError) as refused:
        client(server).chat.completions.create(model="paligemma", messages=user_message(), max_tokens=MAX_TOKENS, frequency_penalty=0.5)
    assert refused.value.code == "unsupported_parameter"
    assert "frequency_penalty is 0.5" in refused.value.message
