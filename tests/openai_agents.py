"""The OpenAI Agents SDK (which speaks the Responses API by default) running
an agent with a function tool through sluice: the model calls the tool, the
SDK runs it and sends its output back, the model answers; then a second run
continues the first by `previous_response_id`.

Usage: python openai_agents.py GATEWAY_URL API_KEY MODEL
Prints one JSON object: each run's final output and the kinds of items it
produced, and the tool calls the agent made. Exits non-zero on any error.
"""
import json
import sys

from agents import Agent, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled
from openai import AsyncOpenAI

gateway_url, api_key, model = sys.argv[1:4]
set_tracing_disabled(True)
client = AsyncOpenAI(base_url=gateway_url + "/v1", api_key=api_key, max_retries=0)
calls = []


@function_tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    calls.append(city)
    return f"sunny in {city}"


agent = Agent(
    name="weather",
    instructions="Answer with the weather.",
    tools=[get_weather],
    model=OpenAIResponsesModel(model=model, openai_client=client),
)
first = Runner.run_sync(agent, "What is the weather in Paris?")
second = Runner.run_sync(
    Agent(name="chat", instructions="Be brief.", model=OpenAIResponsesModel(model=model, openai_client=client)),
    "And tomorrow?",
    previous_response_id=first.last_response_id,
)
print(json.dumps({
    "first": {"output": first.final_output, "items": [item.type for item in first.new_items]},
    "second": {"output": second.final_output, "items": [item.type for item in second.new_items]},
    "calls": calls,
}))
