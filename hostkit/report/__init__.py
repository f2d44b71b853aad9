"""Report: result records (`results`) and how they are shown (`render`: rich tables, JSON, CSV).

The run stage fills the records; nothing here decides anything, so every renderer is a plain
function of the records and can be tested by rendering into a string.
"""
