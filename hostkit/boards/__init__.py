"""Boards edgekit starts and owns: the embedded local daemon and the emulated Raspberry Pi 4.

`launch` starts a managed device (`managed: local` or `managed: qemu-arm64` in the inventory) and
stops it after the run; `emulator` is the arm64 board under qemu in a network namespace of its own,
and `image` its cached Debian root filesystem. The transports ask here when nothing answers at a
managed device's address.
"""
