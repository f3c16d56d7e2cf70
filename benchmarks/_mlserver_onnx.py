"""MLServer custom runtime for the serving benchmark: an ONNX model run by onnxruntime on one thread.

Not a benchmark and never imported in the project's venv: ``benchmarks/serving.py`` copies this file
into a temporary MLServer model repository and MLServer imports it from the separate peer venv
(``make .venv-bench/.installed``; pins in ``benchmarks/mlserver-requirements.txt``). So it imports only
what that venv holds (mlserver, onnxruntime, numpy), nothing of ours.

The work per request mirrors our server's: decode the V2 JSON tensor to numpy (MLServer's NumpyCodec),
``InferenceSession.run`` with one intra-op and one inter-op thread, encode the outputs.
"""

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class OnnxModel(MLModel):
    async def load(self) -> bool:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        uri = await get_model_uri(self.settings)
        self._sess = ort.InferenceSession(uri, sess_options=so, providers=["CPUExecutionProvider"])
        self._outs = [o.name for o in self._sess.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {i.name: NumpyCodec.decode_input(i) for i in payload.inputs}
        outs = self._sess.run(self._outs, feeds)
        return InferenceResponse(
            model_name=self.name,
            outputs=[NumpyCodec.encode_output(n, o) for n, o in zip(self._outs, outs, strict=True)],
        )
