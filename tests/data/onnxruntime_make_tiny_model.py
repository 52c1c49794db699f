"""Writes tests/data/onnxruntime_tiny_add.onnx: y = x + 1 on a float32 [1, 4] tensor.

The smallest graph ONNX Runtime accepts that still has a node to assign to an execution
provider; tests/onnxruntime.rs loads it to check provider registration and the
graph-assignment report. Run from the repository root:

    .venv/bin/python tests/data/onnxruntime_make_tiny_model.py
"""

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OUT = Path(__file__).with_name("onnxruntime_tiny_add.onnx")


def main() -> None:
    one = numpy_helper.from_array(np.ones((1, 4), dtype=np.float32), name="one")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "one"], ["y"], name="add_one")],
        "tiny_add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        initializer=[one],
    )
    # IR 10 / opset 17: loadable by every ONNX Runtime from 1.16 on, so the file never
    # becomes the reason a runtime is rejected.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.checker.check_model(model)
    onnx.save(model, OUT)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
