"""Recovering each image's question from prompt token ids."""

import copy

from vllm_semclip.question import QuestionExtractor, TurnMarkers, learn_turn_markers

LLAMA3_STYLE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'text' %}{{ c['text'] }}{% else %}<image>{% endif %}{% endfor %}{% endif %}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def test_markers_learned_from_llava_template(tokenizer):
    assert learn_turn_markers(tokenizer) == TurnMarkers(user="USER:", assistant="ASSISTANT:")


def test_markers_learned_from_another_template(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = LLAMA3_STYLE
    markers = learn_turn_markers(tok)
    assert markers.user == "<|start_header_id|>user<|end_header_id|>"
    assert markers.assistant.startswith("<|eot_id|><|start_header_id|>assistant")
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is the cat asleep?"}]}],
        tokenize=False, add_generation_prompt=True,
    )
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert QuestionExtractor(tok, "<image>", markers)(ids, 1) == ["Is the cat asleep?"]


def test_no_template_falls_back_to_llava_markers(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    assert learn_turn_markers(tok) == TurnMarkers()


def _ids(tokenizer, text):
    return tokenizer(text)["input_ids"]


def test_question_of_the_turn_that_holds_each_image(tokenizer):
    extract = QuestionExtractor(tokenizer, "<image>")
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is the color of the star?"}]},
        {"role": "assistant", "content": "The color of the star is red."},
        {"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                     {"type": "text", "text": "Is the circle on the left or right side of the cross?"}]},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    questions = extract(_ids(tokenizer, text), 3)
    assert questions == [
        "What is the color of the star?",
        "Is the circle on the left or right side of the cross?",
        "Is the circle on the left or right side of the cross?",
    ]


def test_system_prompt_and_specials_are_not_the_question(tokenizer):
    extract = QuestionExtractor(tokenizer, "<image>")
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": "You are a careful assistant."},
         {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}],
        tokenize=False, add_generation_prompt=True,
    )
    assert extract(_ids(tokenizer, text), 1) == ["What is in the picture?"]


def test_image_only_prompt_has_empty_question(tokenizer):
    extract = QuestionExtractor(tokenizer, "<image>")
    assert extract(_ids(tokenizer, "USER: <image>\n ASSISTANT:"), 1) == [""]
    assert extract(_ids(tokenizer, "<image>"), 1) == [""]


def test_raw_prompt_without_template(tokenizer):
    extract = QuestionExtractor(tokenizer, "<image>")
    assert extract(_ids(tokenizer, "<image>\nWhat is the color of the cup?"), 1) == ["What is the color of the cup?"]
