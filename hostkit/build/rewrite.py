"""Rewriting one operator's calls in a Relax module, every other binding kept as it was.

TVM's `rewrite_call` also rebuilds the bindings around what it rewrites, and it drops a
`match_cast` whose value's static type already fits the cast: a detector binds its count of kept
boxes that way after NMS, whose padded output TVM types as if every box were kept (SSDlite:
27000 rows, of which NMS keeps a few hundred). Without the cast, the post-processing was built
for 27000 rows and its build failed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import tvm

__all__ = ["rewrite_calls"]


def rewrite_calls(mod: "tvm.IRModule", op_name: str,
                  rewrite: Callable[[Any, Any], Any]) -> "tvm.IRModule":
    """`mod` with every call of `op_name` in `main` replaced by `rewrite(call, builder)`, which
    returns the call itself to keep it, and may add functions to the module with `builder`
    (a Relax BlockBuilder). The caller's module is left as it was."""
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    op = tvm.ir.Op.get(op_name)

    @mutator
    class Rewriter(PyExprMutator):
        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            if isinstance(call, relax.Call) and call.op == op:  # typed, as its arguments may be new
                return rewrite(self.builder_.normalize(call), self.builder_)
            return call

    rewriter = Rewriter(mod.clone())  # its builder adds to, and returns, the module it is given
    main = rewriter.visit_expr(mod["main"])
    rewritten: tvm.IRModule = rewriter.builder_.get()
    rewritten["main"] = main
    return rewritten
