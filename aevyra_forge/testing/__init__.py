"""Helpers worth shipping to plug-in authors and test suites: the tiny Llama generator the
engine tests serve with real vLLM."""
