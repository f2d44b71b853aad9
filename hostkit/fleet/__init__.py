"""Fleet: looking after the boards in the inventory, apart from running models on them.

`probe` is `edgekit devices` (is each device there, and what does its daemon say), `doctor` checks
one device step by step and says how to fix each failed step, `provision` installs devicekit and
the host's exact TVM on a board over SSH, offline. The inventory itself (`hostkit.inventory`) sits
below every stage, since the transports read it too.
"""
