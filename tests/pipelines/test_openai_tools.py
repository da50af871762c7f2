"""Function calling's plan (openai_tools.py): which choices are served how, the grammar a forced
call is drawn under, and how calls are read from an answer's text."""

import json

import jsonschema
import pytest

from expertmesh.pipelines.openai_tools import NamedToolChoice, Tool, ToolsError, plan

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
                                                "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time"}}  # no parameters
TOOLS = [Tool.model_validate(WEATHER), Tool.model_validate(TIME)]


def named(name):
    return NamedToolChoice.model_validate({"type": "function", "function": {"name": name}})


def test_choices_and_what_is_refused():
    assert plan(None, None, False).mode == "none" and not plan(None, None, False).active
    assert plan(None, "auto", False).mode == "none"  # auto with no tools: text
    assert plan(TOOLS, "none", False).mode == "none" and plan(TOOLS, "none", False).tools  # still rendered
    assert plan(TOOLS, None, True).mode == "auto"  # tools given: auto by default (OpenAI's)
    assert plan(TOOLS, "required", False).mode == "required"
    assert plan(TOOLS, named("get_time"), False).name == "get_time"
    with pytest.raises(ToolsError, match="does not show tools") as err:
        plan(TOOLS, None, False)  # auto where the template would hide the tools from the model
    assert err.value.param == "tool_choice"
    with pytest.raises(ToolsError, match="not among the tools"):
        plan(TOOLS, named("nope"), True)
    with pytest.raises(ToolsError, match="needs tools"):
        plan(None, "required", True)
    with pytest.raises(ToolsError, match="unique"):
        plan([TOOLS[0], TOOLS[0]], "required", True)


def test_forced_grammars_are_the_tools_schemas():
    g = json.loads(plan(TOOLS, named("get_weather"), False).grammar().source)
    assert g == WEATHER["function"]["parameters"]
    g = json.loads(plan(TOOLS, named("get_time"), False).grammar().source)
    jsonschema.validate({}, g)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"x": 1}, g)  # no parameters: an empty object
    g = json.loads(plan(TOOLS, "required", False).grammar().source)
    jsonschema.validate([{"name": "get_weather", "parameters": {"city": "Oslo"}},
                         {"name": "get_time", "parameters": {}}], g)
    for bad in ([], [{"name": "get_weather", "parameters": {}}], [{"name": "other", "parameters": {}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, g)
    one = json.loads(plan(TOOLS, "required", False, parallel=False).grammar().source)
    assert one["maxItems"] == 1  # parallel_tool_calls false: one call at most
    assert plan(TOOLS, "auto", True).grammar() is None and plan(TOOLS, "none", True).grammar() is None


def test_calls_are_read_from_the_answer():
    content, calls, finish = plan(TOOLS, named("get_weather"), False).parse('{"city":"Oslo"}', "stop")
    assert content is None and finish == "stop" and [(c.name, c.arguments) for c in calls] == [
        ("get_weather", '{"city":"Oslo"}')]
    content, calls, finish = plan(TOOLS, "required", False).parse(
        '[{"name":"get_time","parameters":{}},{"name":"get_weather","parameters":{"city":"Paris"}}]', "stop")
    assert finish == "tool_calls" and [c.name for c in calls] == ["get_time", "get_weather"]
    assert json.loads(calls[1].arguments) == {"city": "Paris"} and calls[0].id != calls[1].id
    auto = plan(TOOLS, "auto", True)
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>\n'
            '<tool_call>{"name": "unknown", "arguments": {}}</tool_call>')
    content, calls, finish = auto.parse(text, "stop")
    assert content == "Let me check." and finish == "tool_calls"
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Rome"})]
    assert auto.parse("Just text.", "stop") == ("Just text.", [], "stop")
    # cut by max_tokens: no valid call, the text as it is
    assert plan(TOOLS, named("get_weather"), False).parse('{"city":"Os', "length") == ('{"city":"Os', [], "length")
