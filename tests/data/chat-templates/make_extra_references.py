#!/usr/bin/env python3
"""Writes extra-references.json: one case per construct the C++ chat-template
renderer supports (core/chat_template.h), rendered with Python's jinja2 the way
Hugging Face transformers renders chat templates (sandboxed environment,
trim_blocks, lstrip_blocks, loopcontrols, raise_exception, tojson with
ensure_ascii=False).

Run once with python3-jinja2 (Debian 12: jinja2 3.1) and commit the output:
    python3 tests/data/chat-templates/make_extra_references.py
The tests read only the JSON; they do not need jinja2.
"""
import json
import os

import jinja2
import jinja2.ext
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment


def raise_exception(message):
    raise TemplateError(message)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' tojson filter.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def make_env():
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env


CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi \"there\" — naïve?\n"},
    {"role": "assistant", "content": "  Hello!  "},
    {"role": "user", "content": "Bye"},
]
VARS = {
    "messages": CONV,
    "items": [3, 1, 2],
    "words": ["b", "a", "c"],
    "d": {"a": 1, "b": "two", "c": [1, 2]},
    "s": "  Hello, World  ",
    "x": 3,
    "n": None,
    "t": True,
    "f": 0.5,
    "empty": [],
    "bos_token": "<s>",
    "eos_token": "</s>",
    "add_generation_prompt": True,
}

CASES = [
    ("namespace",
     "{% set ns = namespace(found=false, n=0) %}{% for m in messages %}"
     "{% if m.role == 'system' %}{% set ns.found = true %}{% endif %}"
     "{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.found }} {{ ns.n }}"),
    ("macro",
     "{% macro tag(name, body='x') %}<{{ name }}>{{ body }}</{{ name }}>{% endmacro %}"
     "{{ tag('a') }}{{ tag('b', body='y') }}{{ tag(name='c', body=1) }}{{ tag() }}"),
    ("macro_uses_globals",
     "{% macro turn(m) -%}\n  [{{ m.role | upper }}] {{ m.content | trim }}{{ eos_token }}\n"
     "{%- endmacro %}\n{% for m in messages %}\n{{ turn(m) }}\n{% endfor %}\n"),
    ("loop_vars",
     "{% for x in items %}{{ loop.index0 }}{{ loop.index }}{{ loop.revindex }}"
     "{{ loop.revindex0 }}{{ loop.first }}{{ loop.last }}{{ loop.length }}"
     "{{ loop.previtem is defined }}{{ loop.nextitem | default('-') }}|{% endfor %}"),
    ("loop_filter_else",
     "{% for x in items if x > 1 %}{{ x }}/{{ loop.length }} {% else %}none{% endfor %}"
     "{% for x in empty %}{{ x }}{% else %}empty{% endfor %}"),
    ("loop_controls",
     "{% for x in range(10) %}{% if x == 2 %}{% continue %}{% endif %}"
     "{% if x > 4 %}{% break %}{% endif %}{{ x }}{% endfor %}{{ range(2, 9, 3) | list }}"),
    ("nested_loops",
     "{% for a in words %}{% for b in items %}{{ a }}{{ b }}{{ loop.index }}"
     "{% endfor %}{{ loop.index }};{% endfor %}"),
    ("filters",
     "{{ '  hi  ' | trim }}|{{ items | length }}|{{ 'abc' | upper }}|{{ 'ABC' | lower }}|"
     "{{ nope | default('d') }}|{{ '' | default('e', true) }}|{{ '' | d('f') }}|"
     "{{ items | join(', ') }}|{{ items | first }}|{{ items | last }}|{{ 42 | string }}|"
     "{{ '17' | int + 1 }}|{{ 'x' | int }}|{{ 3.7 | int }}|{{ ' 8 ' | int }}|"
     "{{ messages | length }}|{{ 'héllo' | length }}|{{ d | length }}|{{ 'hello wORLD' | title }}|"
     "{{ 'hello' | capitalize }}|{{ words | sort }}|{{ items | reverse | list }}|{{ -2 | abs }}|"
     "{{ 'a-b' | replace('-', '+') }}|{{ words | join }}|{{ 2.5 | float }}|{{ '1.5' | float }}|"
     "{{ 3.14159 | round(2) }}|{{ [1, 1, 2] | unique | list }}"),
    ("map_select",
     "{{ messages | map(attribute='role') | join(',') }}|"
     "{{ messages | selectattr('role', 'equalto', 'user') | list | length }}|"
     "{{ messages | rejectattr('role', 'eq', 'user') | map(attribute='role') | list }}|"
     "{{ items | select('odd') | list }}|{{ items | reject('even') | list }}|"
     "{{ words | map('upper') | join }}"),
    ("items_and_dicts",
     "{% for k, v in d | items %}{{ k }}={{ v }};{% endfor %}"
     "{% for k, v in d.items() %}{{ k }}:{{ v }};{% endfor %}"
     "{% for k in d %}{{ k }}{% endfor %}{{ d.keys() | list }}{{ d.values() | list }}"
     "{{ d.get('a') }}{{ d.get('zz', 'dflt') }}{{ d.get('zz') }}{{ d['b'] }}{{ d.b }}"
     "{{ {'k': 'v', 'n': [1, {'x': none}]} }}{{ dict(a=1, b='z') }}"),
    ("tojson",
     "{{ messages | tojson }}\n{{ d | tojson(indent=2) }}\n{{ 1.5 | tojson }}{{ none | tojson }}"
     "{{ true | tojson }}{{ 'tab\\tctl\\x01é' | tojson }}{{ [] | tojson }}{{ {} | tojson }}"
     "{{ [[]] | tojson(indent=4) }}"),
    ("slicing",
     "{{ items[1:] }}{{ items[:-1] }}{{ items[::-1] }}{{ items[::2] }}{{ 'héllo'[1:3] }}"
     "{{ 'abc'[-1] }}{{ items[-1] }}{{ messages[1:][0].role }}{{ items[5:] }}{{ items[-10:1] }}"
     "{{ 'héllo'[::-1] }}{{ items[1:2:1] }}{{ (1, 2, 3)[1:] }}"),
    ("tests",
     "{{ x is defined }}{{ y is defined }}{{ x is none }}{{ n is none }}{{ s is string }}"
     "{{ x is string }}{{ x is number }}{{ f is float }}{{ x is integer }}{{ t is boolean }}"
     "{{ d is mapping }}{{ items is iterable }}{{ items is sequence }}{{ 4 is even }}"
     "{{ 3 is odd }}{{ 9 is divisibleby 3 }}{{ x is not defined }}{{ s is eq '  Hello, World  ' }}"
     "{{ y is undefined }}{{ t is true }}{{ t is false }}{{ x is gt 2 }}{{ x is lt 2 }}"
     "{{ 2 is in items }}{{ raise_exception is callable }}{{ x is ne 3 }}{{ x is ge 3 }}"),
    ("string_methods",
     "{{ s.strip() }}|{{ s.lstrip() }}|{{ s.rstrip() }}|{{ s.upper() }}|{{ s.lower() }}|"
     "{{ s.startswith('  He') }}|{{ s.endswith('d  ') }}|{{ s.split() }}|{{ 'a,b,,c'.split(',') }}|"
     "{{ 'a b c'.split(' ', 1) }}|{{ s.replace('l', 'L') }}|{{ 'hello wORLD'.title() }}|"
     "{{ 'xxhixx'.strip('x') }}|{{ 'naïve café'.upper() }}|{{ 'ÉCOLE'.lower() }}|"
     "{{ s.startswith(('x', '  H')) }}|{{ 'abcabc'.find('c') }}|{{ 'abcabc'.count('bc') }}|"
     "{{ '-'.join(words) }}|{{ 'hello'.capitalize() }}|{{ 'a\\u00a0b\\u2003'.strip() }}|"
     "{{ 'aXbXc'.replace('X', '', 1) }}|{{ messages[1].content.strip() }}"),
    ("logic_and_comparison",
     "{{ 'a' in 'cat' }}{{ 2 in items }}{{ 'k' not in d }}{{ 1 < 2 < 3 }}{{ 1 < 3 < 2 }}"
     "{{ x and y }}{{ 0 or 'z' }}{{ not x }}{{ 1 == 1.0 }}{{ 'a' != 'b' }}{{ 2 >= 2 }}"
     "{{ none == none }}{{ [1, 2] == [1, 2] }}{{ 'a' < 'b' }}{{ not x is defined }}"
     "{{ x > 1 and x < 5 or false }}{{ true and 'last' }}{{ [] or 'fallback' }}"),
    ("arithmetic",
     "{{ 7 % 3 }} {{ -7 % 3 }} {{ 7 % -3 }} {{ 7 // 2 }} {{ -7 // 2 }} {{ 7 / 2 }} {{ 2 ** 10 }} "
     "{{ 1 + 2 * 3 }} {{ (1 + 2) * 3 }} {{ 'ab' * 3 }} {{ 1.5 + 1 }} {{ 0.1 + 0.2 }} {{ 1e20 }} "
     "{{ 10 / 4 }} {{ -x }} {{ x - 5 }} {{ 2.0 * 3 }} {{ 1 / 3 }} {{ 1e-7 }} {{ 123456789.0 * 1000 }} "
     "{{ 5.5 % 2 }} {{ -5.5 // 2 }} {{ [1] + [2] }} {{ t + 1 }} {{ 1e16 }} {{ 2 ** -1 }}"),
    ("concat", "{{ 'a' ~ 1 ~ none ~ true ~ [1] ~ 2.0 ~ nope ~ 'z' }}"),
    ("conditional_expression",
     "{{ 'yes' if x else 'no' }}|{{ 'only' if false }}|{{ 'a' if n else 'b' if x else 'c' }}"),
    ("set_block", "{% set greeting %}Hello {{ messages[1].role }}{% endset %}{{ greeting | upper }}"),
    ("scoping",
     "{% set c = 0 %}{% for i in items %}{% set c = c + i %}{{ c }}{% endfor %}{{ c }}"
     "{% if true %}{% set c = 9 %}{% endif %}{{ c }}{% set a, b = 1, 2 %}{{ a }}{{ b }}"),
    ("elif_chain",
     "{% for m in messages %}{% if m.role == 'system' %}S{% elif m.role == 'user' %}U"
     "{% elif m.role == 'assistant' %}A{% else %}?{% endif %}{% endfor %}"),
    ("printing",
     "{{ none }}|{{ true }}|{{ [1, 'a', none, 2.5, false] }}|{{ {'k': 'v'} }}|{{ (1, 2) }}|{{ (1,) }}|"
     "{{ \"it's\" }}|{{ ['it\\'s', \"q\\\"\"] }}|{{ ['a\\nb', 'tab\\t'] }}|{{ 1.0 }}|{{ 100.0 }}|{{ -0.0 }}|"
     "{{ 12345678901234567.0 }}|{{ 0.0001 }}|{{ 0.00001 }}|{{ nope }}|{{ ['é'] }}"),
    ("string_literals",
     "{{ 'tab\\there\\nnl \\u00e9 \\x41 \\\\ \\q' }}|{{ \"dq 'single'\" }}|{{ 'a' 'b' }}|"
     "{{ '\\101\\U0001F642' }}"),
    ("whitespace_control",
     "Start\n  {%- if true %}\n    inner {{- ' x ' -}} \n  {% endif -%}\n  tail {# note #}\n"
     "  {#- gone -#}\n  end {{ 'v' }}  \n  {%+ if true %}kept-indent{% endif %}\n"
     "line {%- if true +%}\nkeep-newline{% endif %}\n"),
    ("trim_and_lstrip_blocks",
     "<list>\n  {% for m in messages %}\n    {% if m.role == 'user' %}\n    * {{ m.content | trim }}\n"
     "    {% endif %}\n  {% endfor %}\n</list>\n  {# comment line #}\nafter\n\n"),
    ("newlines",
     "a\r\nb\rc{% if true %}\r\nd{% endif %}\n\n"),
    ("raise_in_macro",
     "{% macro check(m) %}{% if m.role not in ['user', 'assistant', 'system'] %}"
     "{{ raise_exception('Unknown role: ' + m.role) }}{% endif %}ok{% endmacro %}"
     "{% for m in messages %}{{ check(m) }}{% endfor %}{{ check({'role': 'tool'}) }}"),
    ("raise_after_output", "partial {{ raise_exception('stop at ' ~ x) }} never"),
    ("error_call_undefined", "{{ foo() }}"),
    ("error_attr_of_undefined", "{{ nothere.x }}"),
    ("error_missing_key_then_attr", "{{ d.missing.x }}"),
    ("error_str_plus_int", "{{ 'a' + 1 }}"),
    ("error_undefined_in_math", "{{ nope + 1 }}"),
    ("error_syntax_unclosed", "{% if x %}open"),
    ("error_syntax_unknown_tag", "{% frobnicate %}"),
    ("error_unknown_filter", "{{ x | frobnicate }}"),
    # Real templates in the style of popular models.
    ("llama3_style",
     "{% set loop_messages = messages %}{% for message in loop_messages %}"
     "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
     "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
     "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
     "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
     "{% endif %}"),
    ("zephyr_style",
     "{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
     "{{ '<|user|>\\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n"
     "{{ '<|system|>\\n' + message['content'] + eos_token }}\n"
     "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\\n'  + message['content'] + eos_token }}\n"
     "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n"
     "{% endfor %}"),
    ("qwen2_style",
     "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
     "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
     "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
     "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
    ("gemma_style",
     "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
     "{{ raise_exception('System role not supported') }}{% endif %}"
     "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
     "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
     "{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}"
     "{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\\n' + "
     "message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}"
     "{{'<start_of_turn>model\\n'}}{% endif %}"),
    ("gemma_style_no_system",
     "{{ bos_token }}{% for message in messages[1:] %}{% if (message['role'] == 'assistant') %}"
     "{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
     "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
     "{% endfor %}"),
    ("mistral_v3_tools_style",
     "{%- if messages[0][\"role\"] == \"system\" %}\n    {%- set system_message = messages[0][\"content\"] %}\n"
     "    {%- set loop_messages = messages[1:] %}\n{%- else %}\n    {%- set loop_messages = messages %}\n"
     "{%- endif %}\n{%- if not tools is defined %}\n    {%- set tools = none %}\n{%- endif %}\n"
     "{%- set user_messages = loop_messages | selectattr(\"role\", \"equalto\", \"user\") | list %}\n\n"
     "{{- bos_token }}\n{%- for message in loop_messages %}\n    {%- if message[\"role\"] == \"user\" %}\n"
     "        {%- if tools is not none and (message == user_messages[-1]) %}\n"
     "            {{- \"[AVAILABLE_TOOLS] [\" }}\n        {%- endif %}\n"
     "        {%- if loop.last and system_message is defined %}\n"
     "            {{- \"[INST] \" + system_message + \"\\n\\n\" + message[\"content\"] + \"[/INST]\" }}\n"
     "        {%- else %}\n            {{- \"[INST] \" + message[\"content\"] + \"[/INST]\" }}\n"
     "        {%- endif %}\n    {%- elif message[\"role\"] == \"assistant\" %}\n"
     "        {{- \" \" + message[\"content\"]|trim + eos_token}}\n    {%- else %}\n"
     "        {{- raise_exception(\"Only user and assistant roles are supported, with the exception of an initial optional system message!\") }}\n"
     "    {%- endif %}\n{%- endfor %}\n"),
    ("whitespace_edges",
     "  {%- if true %}A{% endif %}\n  {% if true %}B{% endif %}\nx  {% if true %}C{% endif %}\n"
     "  {{ 'D' }}\n\t{% if true %}\n E\n\t{% endif %}\n{{ 'F' -}}\n\n  G {#- c #}\n"
     "  {# own line #}\nH{{- ' I ' }}J {%- if true -%}  K  {%- endif -%}  \n\n L\n"
     "{% for x in [1, 2] %}\n  {{ x }}\n{% endfor %}\n{% if true %}end{% endif %}\n\n"),
    ("whitespace_plus_and_minus",
     "a  {%+ if true +%}\n  b {%- if true %}\n c\n{%+ endif -%}\n\n d {% endif %}\n  {#+ k +#}\ne"),
    ("template_ending_in_tag_newline", "{% for m in messages %}{{ m.role }}\n{% endfor %}\n"),
    ("deepseek_style",
     "{% set ns = namespace(is_first=false, system_prompt='', is_tool=false) %}"
     "{%- for message in messages %}{%- if message['role'] == 'system' %}"
     "{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}"
     "{{ bos_token }}{{ ns.system_prompt }}"
     "{%- for message in messages %}{%- if message['role'] == 'user' %}"
     "{{ '<｜User｜>' + message['content'] }}{%- endif %}"
     "{%- if message['role'] == 'assistant' %}{% set content = message['content'] %}"
     "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
     "{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}{%- endif %}{%- endfor -%}"
     "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\n' }}{% endif %}"),
    ("multimodal_content_parts",
     "{% for message in messages %}{{ message.role }}: {% if message.content is string %}"
     "{{ message.content }}{% else %}{% for part in message.content %}{% if part.type == 'text' %}"
     "{{ part.text }}{% elif part.type == 'image' %}<image>{% endif %}{% endfor %}{% endif %}\n"
     "{% endfor %}"),
    ("phi3_style",
     "{% for message in messages %}{% if message['role'] == 'system' %}"
     "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
     "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
     "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
     "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"),
    ("generation_prompt_false",
     "{% for m in messages %}{{ m.role }}{% endfor %}{% if add_generation_prompt %}+{% endif %}"),
]

# Cases rendered with different variables.
VAR_OVERRIDES = {
    "generation_prompt_false": {"add_generation_prompt": False},
    "deepseek_style": {"messages": [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "<think>hmm</think>A1"},
        {"role": "user", "content": "Q2"}]},
    "multimodal_content_parts": {"messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "A cat."}]},
}


def main():
    env = make_env()
    out = {
        "jinja2_version": jinja2.__version__,
        "variables": VARS,
        "cases": [],
    }
    for name, source in CASES:
        variables = dict(VARS)
        variables.update(VAR_OVERRIDES.get(name, {}))
        case = {"name": name, "template": source}
        if name in VAR_OVERRIDES:
            case["variables"] = VAR_OVERRIDES[name]
        try:
            case["text"] = env.from_string(source).render(**variables)
        except TemplateError as e:
            case["error"] = e.message if hasattr(e, "message") and e.message else str(e)
            case["error_type"] = type(e).__name__
        except Exception as e:  # TypeError and the like, as jinja2 raises them
            case["error"] = str(e)
            case["error_type"] = type(e).__name__
        out["cases"].append(case)
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "extra-references.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
