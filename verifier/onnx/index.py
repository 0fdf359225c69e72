"""Which ONNX nodes matter, what they compute and who reads what: the first pass of the import.

`NodeIndex` keeps only the nodes the graph output depends on (the rest are dropped unseen, so a
dead branch may hold any op), checks that they come in topological order, folds the constant
ones (`verifier.onnx.folding`), sets apart the shape computations (Shape, Size and what is
computed from them alone), and indexes the remaining *computed* nodes by the tensors they write
and read. It also refuses, naming the node, an unsupported op type or a computed tensor in an
input that must be a constant (a weight, a bound, pads, axes).
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import NodeProto

from verifier.errors import GraphError
from verifier.onnx.converters import DATA_INPUTS, LAYOUT, RESHAPES, SUPPORTED_OPS
from verifier.onnx.folding import SHAPE_SOURCES, ConstantFolder

_CUT_HINT = (
    ' (or box only parameters after it, e.g. `parameters: ["head.*"]` in the spec, so that '
    "the part before them runs frozen in onnxruntime)"
)


class NodeIndex:
    """The nodes between one graph input and one graph output, indexed.

    Attributes:
        producer: computed (or shape) tensor -> the node that writes it.
        consumers: computed tensor (graph input included) -> (node, input slot) of every
            reader, Shape and Size nodes included.
        shape_tensors: tensors computed from shapes alone (their values are sizes).
        computed: the nodes to map onto ops, in topological order.
    """

    def __init__(
        self,
        path: Path,
        nodes: list[NodeProto],
        folder: ConstantFolder,
        inferred: dict[str, onnx.ValueInfoProto],
        input_name: str,
        output_name: str,
    ) -> None:
        """Index `nodes` (folding constants into `folder`) for the given graph input and output.

        Raises:
            GraphError: the output is produced by no node or does not depend on the input; a
                node reads a tensor before it is computed (a cycle) or one that does not exist;
                a node has a non-default domain or an unsupported op type, or a computed tensor
                where a constant is needed.
        """
        self.path, self.folder, self.constants = path, folder, folder.values
        self.input_name, self.output_name = input_name, output_name
        self.producer: dict[str, NodeProto] = {}
        self.consumers: dict[str, list[tuple[NodeProto, int]]] = {}
        self.shape_tensors: set[str] = set()
        self.computed: list[NodeProto] = []
        made_by = {o: n for n in nodes for o in n.output if o}
        live = self._live(made_by)
        for node in nodes:
            if id(node) in live:
                self._add(node, made_by, inferred)
        if output_name not in self.producer:
            raise GraphError(
                f"{path}: output '{output_name}' does not depend on input '{input_name}' (it is "
                "a constant); export a classifier of its input"
            )

    def _live(self, made_by: dict[str, NodeProto]) -> set[int]:
        """ids of the nodes the graph output depends on."""
        output = self.output_name
        if output not in made_by:
            if output == self.input_name:
                raise GraphError(
                    f"{self.path}: output '{output}' is the graph input; there is nothing to "
                    "bound, export a classifier"
                )
            raise GraphError(
                f"{self.path}: graph output '{output}' is produced by no node (a dangling "
                "output); re-export the model"
            )
        live: set[int] = set()
        stack, seen = [output], set()
        while stack:
            tensor = stack.pop()
            node = made_by.get(tensor)
            if tensor in seen or node is None:
                continue
            seen.add(tensor)
            live.add(id(node))
            stack.extend(i for i in node.input if i)
        return live

    def _add(
        self,
        node: NodeProto,
        made_by: dict[str, NodeProto],
        inferred: dict[str, onnx.ValueInfoProto],
    ) -> None:
        if node.domain not in ("", "ai.onnx"):
            raise self.folder.fail(
                node, f"ops of domain '{node.domain}' are not supported; export standard ONNX"
            )
        self._check_order(node, made_by)
        if self.folder.try_fold(node, inferred):
            return
        for out in node.output:
            if out:
                self.producer[out] = node
        for index, name in enumerate(node.input):
            if name and name not in self.constants:
                self.consumers.setdefault(name, []).append((node, index))
        dynamic = [i for i in node.input if i and i not in self.constants]
        if node.op_type in SHAPE_SOURCES or (
            dynamic and all(i in self.shape_tensors for i in dynamic)
        ):
            self.shape_tensors.update(o for o in node.output if o)
        elif node.op_type not in SUPPORTED_OPS:
            raise self.folder.fail(node, self._unsupported(node))
        else:
            self._check_slots(node)
            self.computed.append(node)

    def _check_order(self, node: NodeProto, made_by: dict[str, NodeProto]) -> None:
        for name in node.input:
            if not name or name == self.input_name:
                continue
            if name in self.constants or name in self.producer:
                continue
            if name in made_by:
                raise self.folder.fail(
                    node,
                    f"reads '{name}' before any node computes it: the graph has a cycle or is "
                    "not in topological order; re-export the model (or sort its nodes)",
                )
            raise self.folder.fail(
                node, f"reads '{name}', which is no graph input, initializer or node output"
            )

    def _check_slots(self, node: NodeProto) -> None:
        """Computed tensors only where the op takes data; constants (or shapes) elsewhere."""
        slots = DATA_INPUTS.get(node.op_type, (0,))
        for index, name in enumerate(node.input):
            if not name or name in self.constants:
                continue
            if slots is None or index in slots:
                if name in self.shape_tensors:
                    raise self.folder.fail(
                        node, f"uses the shape tensor '{name}' as data; this is not supported"
                    )
                continue
            shape_slot = node.op_type in RESHAPES | LAYOUT and (node.op_type, index) != ("Pad", 2)
            if shape_slot and name in self.shape_tensors:
                continue
            if shape_slot:
                raise self.folder.fail(
                    node,
                    f"its input {index} '{name}' depends on the values of computed tensors, so "
                    "the output shape cannot be resolved; compute shapes, axes, starts and pads "
                    "from constants or Shape only",
                )
            raise self.folder.fail(
                node,
                f"its input {index} '{name}' is computed from the network input; weights, "
                "biases, statistics and bounds must be constants",
            )

    def _unsupported(self, node: NodeProto) -> str:
        what = f"op type '{node.op_type}' is not supported"
        if node.op_type in ("Softmax", "LogSoftmax"):
            if node.output[0] == self.output_name:
                return f"{what}; the bound engine needs logits: export without the final Softmax"
            return f"{what} inside the network; only the supported ops can be bounded{_CUT_HINT}"
        return f"{what}; rewrite the model with supported ops{_CUT_HINT}"

    def users(self, tensor: str) -> list[NodeProto]:
        """The nodes that read the values of `tensor` (Shape and Size read only its shape)."""
        users: list[NodeProto] = []
        for node, _ in self.consumers.get(tensor, []):
            if node.op_type not in SHAPE_SOURCES and all(node is not u for u in users):
                users.append(node)
        return users

    def is_read(self, tensor: str) -> bool:
        """Whether any node reads `tensor` (its values or its shape) or it is the graph output."""
        return tensor in self.consumers or tensor == self.output_name

    def sole_user(self, tensor: str, *, shapes_too: bool = False) -> NodeProto | None:
        """The only node that reads `tensor`, when there is one and the tensor is no graph
        output (with `shapes_too`, no Shape or Size node may read it either)."""
        users = self.users(tensor)
        if tensor == self.output_name or len(users) != 1:
            return None
        if shapes_too and len(self.consumers.get(tensor, [])) != 1:
            return None
        return users[0]
