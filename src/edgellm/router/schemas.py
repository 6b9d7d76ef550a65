"""OpenAI's API as the router takes it: the worker protocol's request bodies with EdgeLLM's
`disaggregation`, and what they become, an `InferenceRequestSpec`, so that the router's
scheduler sees exactly what an InferenceRequest would say.

Unknown fields pass, as in vLLM's server: clients of newer API versions send fields this
router does not know. Features EdgeLLM cannot honour (several choices, log probabilities, tools,
echo) are refused with a 400 naming the parameter, never silently ignored: the protocol's
models check them.
"""

from edgellm.api import InferenceRequestSpec
from edgellm.api.inferencerequest import Disaggregation, Placement
from edgellm.workerapi import protocol


class CompletionRequest(protocol.CompletionRequest):
    disaggregation: Disaggregation = "auto"
    """EdgeLLM's: split prefill and decode over two peers."""

    def spec(self) -> InferenceRequestSpec:
        return InferenceRequestSpec(
            model=self.model,
            prompt=self.text,
            sampling=self.sampling(self.max_tokens),
            placement=Placement(disaggregation=self.disaggregation),
        )


class ChatCompletionRequest(protocol.ChatCompletionRequest):
    disaggregation: Disaggregation = "auto"
    """EdgeLLM's: split prefill and decode over two peers."""

    def spec(self) -> InferenceRequestSpec:
        return InferenceRequestSpec(
            model=self.model,
            messages=[m.chat_message() for m in self.messages],
            sampling=self.sampling(self.limit),
            placement=Placement(disaggregation=self.disaggregation),
        )
