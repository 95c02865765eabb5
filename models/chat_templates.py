"""The chat templates of the released checkpoints, as their processors ship them, so that the toy
models render exactly what the real ones render (each is tested against a hand-written string).

How each closes an assistant turn differs, and none of them closes it with exactly one EOS:
LLaVA-1.5 appends the answer plus a space, LLaVA-NeXT (Mistral) a literal `<\\s> ` that is not the
EOS token, Qwen2-VL `<|im_end|>` plus a newline. The collator therefore never trusts the template's
ending: it labels the response and appends one end-of-turn token itself.
"""

# The system line of LLaVA's `v1` conversation, conv_vicuna_v1 (LLaVA c121f04 llava/conversation.py:242-244,
# registered as "v1" at :376): what `--version v1` trains with -- LLaVA-1.5's own finetune scripts and the
# paper's unlearning runs (OPTML-Group/VLM-Safety-Unlearn 1f89239 llava/train/train_unlearn_full.py:954-955
# sets default_conversation = conv_templates[version]). The HF template below renders a system turn as this
# text and a space, then "USER: ...", as v1 does.
LLAVA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the user's questions.")
# conv_llava_v1 (llava/conversation.py:325-327, "llava_v1" at :387): the same turns under a "human" system
# line, which the official *evaluation* uses (VLM-Safety-Unlearn eval/utils/model_utils.py:29).
LLAVA_V1_EVAL_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                        "The assistant gives helpful, detailed, and polite answers to the human's questions.")

# llava-hf/llava-1.5-7b-hf and -13b-hf (also llava-hf/llava-v1.6-vicuna-7b-hf).
LLAVA_1_5 = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}"
    "{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# llava-hf/llava-v1.6-mistral-7b-hf. It has no generation-prompt block: the prompt ends with " [/INST]".
# The assistant turn ends with the literal text "<\s> " (backslash), as released.
LLAVA_NEXT_MISTRAL = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' }}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}"
    "{% endfor %}{# Render all text next #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}"
    "{% endfor %}{{' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    r"{{ ' ' + message['content'][0]['text'] + '<\s> '}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

# Qwen/Qwen2-VL-2B-Instruct, -7B-Instruct and Qwen/Qwen2.5-VL-*-Instruct (one template).
QWEN2_VL = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
