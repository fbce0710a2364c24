"""Example TF Serving client: one BraTS case in, its label-map NIfTI out.

Reads ``<case_dir>/<case>_{t1,t1ce,t2,flair}.nii.gz`` (channel order
``data_pipeline.constants.MODALITIES``), sends the RAW volume (the SavedModel
normalises and pads in its graph, see brats_tf/export.py) to a
``tensorflow_model_server`` over REST (JSON) or gRPC, and writes
``<output_dir>/<case>.nii.gz`` (uint8 labels) with the case's affine and header,
and ``<output_dir>/<case>.json``: how the labels were made (the SavedModel's
``protocol`` output: region, padding, TTA, ensemble size, threshold,
post-processing) and by which server, model and signature.

    python -m serving.client --case_dir=/data/Brats18_2013_2_1 --output_dir=/preds \\
        --server=http://localhost:8501 --model_name=brats

REST sends the volume as JSON text (a 240x240x155x4 case is ~35.7 M numbers,
some 300 MB of JSON, and the response carries the probabilities as well);
gRPC (``--protocol=grpc --grpc_server=localhost:8500``, needs the
``tensorflow-serving-api`` package) sends 143 MB of binary float32 and asks
for the ``labels`` and ``protocol`` outputs only.

``--et_min_voxels=N`` applies the post-processing here, to the labels the
server returns (``data_pipeline.volume.et_to_necrosis``, the same function the
SavedModel exported with ``--et_min_voxels`` runs in its graph).

The request builders and response decoders are plain functions, testable
without a server (tests/test_client.py feeds them through the SavedModel).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
import urllib.error
import urllib.request

import numpy as np

from brats_tf.saved_model_names import INPUT_NAME, SIGNATURES
from data_pipeline import constants, volume
from data_pipeline.io_utils import write_text_atomic
from data_pipeline.prediction_nifti import write_prediction_nifti

REST_FORMATS = ("inputs", "instances")
OUTPUT_DTYPES = {"probabilities": np.float32, "labels": np.uint8}


# ------------------------------------------------------------------ reading
def case_files(case_dir, case_id: str | None = None) -> dict[str, pathlib.Path]:
    """{modality: path} of a case's four volumes, in ``constants.MODALITIES`` order.

    BraTS 2017-2021 naming ``<case_dir>/<case_id>_{t1,t1ce,t2,flair}.nii.gz``, or
    BraTS 2023 naming ``<case_id>-{t1n,t1c,t2w,t2f}.nii.gz`` (the same modalities,
    ``constants.MODALITIES_2023``); ``.nii`` is accepted too. ``case_id``
    defaults to the directory's name (the BraTS layout).
    """
    case_dir = pathlib.Path(case_dir)
    case_id = case_id or case_dir.name
    if not case_dir.is_dir():
        raise FileNotFoundError(f"case {case_id}: case directory not found: {case_dir}")

    def find(modality: str, separator: str) -> pathlib.Path | None:
        for ext in (".nii.gz", ".nii"):
            path = case_dir / f"{case_id}{separator}{modality}{ext}"
            if path.is_file():
                return path
        return None

    for modalities, separator in ((constants.MODALITIES_2023, "-"), (constants.MODALITIES, "_")):
        files = {m: find(m, separator) for m in modalities}
        if any(files.values()):
            break  # else: report the BraTS 2017-2021 names as missing
    missing = [m for m, p in files.items() if p is None]
    if missing:
        raise FileNotFoundError(
            f"case {case_id}: missing {case_dir / f'{case_id}{separator}{missing[0]}.nii.gz'}"
        )
    return dict(zip(constants.MODALITIES, files.values()))


def load_case(case_dir, case_id: str | None = None):
    """Loads a case's four modalities.

    Returns (image, reference): image [D, H, W, 4] float32 raw intensities in
    ``constants.MODALITIES`` order; reference = the first modality's nibabel
    image (its affine and header are given to the written prediction).
    """
    import nibabel as nib

    case_id = case_id or pathlib.Path(case_dir).name
    channels, reference = [], None
    for path in case_files(case_dir, case_id).values():
        try:
            img = nib.load(str(path))
            data = np.asarray(img.dataobj, dtype=np.float32)
        except Exception as e:  # nibabel raises many types for bad files
            raise ValueError(f"case {case_id}: cannot read {path}: {e}") from None
        data = np.squeeze(data, axis=3) if data.ndim == 4 and data.shape[3] == 1 else data
        if data.ndim != 3:
            raise ValueError(f"case {case_id}: {path} is not a 3-D volume (shape {data.shape})")
        if not np.all(np.isfinite(data)):
            raise ValueError(f"case {case_id}: {path} contains NaN or infinite values")
        if reference is None:
            reference = img
        elif data.shape != reference.shape[:3]:
            raise ValueError(
                f"case {case_id}: {path} has shape {data.shape}, "
                f"{constants.MODALITIES[0]} has {reference.shape[:3]}"
            )
        elif not np.allclose(img.affine, reference.affine, atol=1e-3):
            raise ValueError(
                f"case {case_id}: {path} has another affine than the "
                f"{constants.MODALITIES[0]} image (not co-registered?)"
            )
        channels.append(data)
    return np.stack(channels, axis=-1), reference


def _as_batch(image) -> np.ndarray:
    image = np.asarray(image, dtype=np.float32)
    if image.ndim not in (4, 5) or image.shape[-1] != constants.NUM_MODALITIES:
        raise ValueError(
            f"image must be [D, H, W, {constants.NUM_MODALITIES}] or "
            f"[B, D, H, W, {constants.NUM_MODALITIES}], got shape {image.shape}"
        )
    return image[None] if image.ndim == 4 else image


def _check_signature(signature_name: str) -> str:
    if signature_name not in SIGNATURES:
        raise ValueError(f"signature_name must be one of {SIGNATURES}, got {signature_name!r}")
    return signature_name


# --------------------------------------------------------------------- REST
def rest_request(image, signature_name: str = "serving_default", fmt: str = "inputs") -> dict:
    """The TF Serving REST predict request for raw image(s) [D, H, W, 4] or [B, D, H, W, 4].

    ``fmt="inputs"``: columnar, ``{"signature_name": ..., "inputs": {"image": [B, ...]}}``;
    ``fmt="instances"``: row format, ``{"signature_name": ..., "instances": [{"image": ...}]}``.
    """
    batch = _as_batch(image)
    _check_signature(signature_name)
    if fmt == "inputs":
        return {"signature_name": signature_name, "inputs": {INPUT_NAME: batch.tolist()}}
    if fmt == "instances":
        return {
            "signature_name": signature_name,
            "instances": [{INPUT_NAME: example.tolist()} for example in batch],
        }
    raise ValueError(f"fmt must be one of {REST_FORMATS}, got {fmt!r}")


def rest_url(server: str, model_name: str, version: int | None = None) -> str:
    """``<server>/v1/models/<name>[/versions/<v>]:predict``."""
    if not server.startswith(("http://", "https://")):
        raise ValueError(f"server must start with http:// or https://, got {server!r}")
    if not model_name or "/" in model_name:
        raise ValueError(f"model_name must be a plain name, got {model_name!r}")
    path = f"/v1/models/{model_name}" + (f"/versions/{int(version)}" if version else "")
    return server.rstrip("/") + path + ":predict"


def decode_rest_response(response) -> dict[str, np.ndarray]:
    """TF Serving's REST response (text or parsed JSON) -> {"labels", "probabilities"} arrays.

    Accepts the columnar ``{"outputs": {...}}`` and the row ``{"predictions": [...]}``
    forms; each output gets a leading batch axis: labels [B, D, H, W] uint8,
    probabilities [B, D, H, W, 3] float32.
    """
    if isinstance(response, (str, bytes)):
        response = json.loads(response)
    if not isinstance(response, dict):
        raise ValueError(f"unexpected response type {type(response).__name__}")
    if "error" in response:
        raise RuntimeError(f"server error: {response['error']}")
    if "outputs" in response:
        outputs = response["outputs"]
        if not isinstance(outputs, dict):  # a single-output signature
            raise ValueError("response 'outputs' is not a dict of named outputs")
    elif "predictions" in response:
        rows = response["predictions"]
        if not rows or not isinstance(rows[0], dict):
            raise ValueError("response 'predictions' is not a list of named outputs")
        outputs = {name: [row[name] for row in rows] for name in rows[0]}
    else:
        raise ValueError(f"response has neither 'outputs' nor 'predictions': {sorted(response)}")
    return _typed(outputs)


def _typed(outputs: dict) -> dict:
    """Named outputs -> {"labels", ["probabilities"], ["protocol"]}: arrays, and
    the protocol as a dict (the first case's; one export made them all)."""
    decoded = {}
    for name, dtype in OUTPUT_DTYPES.items():
        if name in outputs:
            decoded[name] = np.asarray(outputs[name], dtype=dtype)
    if "labels" not in decoded:
        raise ValueError(f"response has no 'labels' output: {sorted(outputs)}")
    if "protocol" in outputs:
        first = np.asarray(outputs["protocol"], dtype=object).reshape(-1)[0]
        try:
            decoded["protocol"] = json.loads(first.decode() if isinstance(first, bytes) else first)
        except (ValueError, AttributeError) as e:
            raise ValueError(f"response's 'protocol' output is not JSON ({e})") from None
    return decoded


def send_rest(url: str, request: dict, timeout: float = 600.0) -> dict:
    """POSTs the JSON request; returns the parsed JSON response (one-line errors)."""
    body = json.dumps(request).encode()
    http = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(http, timeout=timeout) as reply:
            text = reply.read()
        try:
            return json.loads(text)
        except ValueError as e:  # a proxy's HTML page, a truncated reply...
            start = text[:80].decode(errors="replace").replace("\n", " ")
            raise RuntimeError(f"{url}: the reply is not JSON ({e}; it starts {start!r})") from None
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace").strip().replace("\n", " ")[:500]
        raise RuntimeError(f"{url}: HTTP {e.code}: {detail}") from None
    except urllib.error.URLError as e:
        raise RuntimeError(f"{url}: cannot connect: {e.reason}") from None


# --------------------------------------------------------------------- gRPC
def grpc_available() -> bool:
    """Whether tensorflow-serving-api (gRPC's request types) can be imported."""
    try:
        import tensorflow_serving.apis.predict_pb2  # noqa: F401  only tried, never used
    except ImportError:
        return False
    return True


def grpc_request(
    image,
    model_name: str = "brats",
    signature_name: str = "serving_default",
    version: int | None = None,
    outputs=("labels", "protocol"),
):
    """A ``tensorflow_serving.apis.predict_pb2.PredictRequest`` for raw image(s).

    ``outputs`` fills ``output_filter`` (default: only the labels come back).
    """
    if not grpc_available():
        raise RuntimeError(
            "gRPC needs the tensorflow-serving-api package "
            "(pip install tensorflow-serving-api==2.21.0), or use REST"
        )
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    batch = _as_batch(image)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = _check_signature(signature_name)
    if version:
        request.model_spec.version.value = int(version)
    request.inputs[INPUT_NAME].CopyFrom(tf.make_tensor_proto(batch, dtype=tf.float32))
    unknown = set(outputs or ()) - set(OUTPUT_DTYPES) - {"protocol"}
    if unknown:
        raise ValueError(f"unknown outputs {sorted(unknown)}; known: {sorted(OUTPUT_DTYPES)}")
    request.output_filter.extend(outputs or ())
    return request


def decode_grpc_response(response) -> dict[str, np.ndarray]:
    """A PredictResponse -> {"labels", ["probabilities"]} arrays with a batch axis."""
    import tensorflow as tf

    return _typed({name: tf.make_ndarray(proto) for name, proto in response.outputs.items()})


def case_protocol(server_protocol: dict | None, et_min_voxels: int) -> dict:
    """What produced a case's labels: the server's protocol (its ``protocol``
    output; None from a SavedModel that does not report one), with the
    client's post-processing added (the larger ET threshold wins: applying
    both is applying the larger)."""
    et_min_voxels = volume.check_et_min_voxels(et_min_voxels)
    record = (
        dict(server_protocol)
        if server_protocol
        else {"unknown": "the server's model does not report its protocol (export it again)"}
    )
    server_n = int(record.get("et_min_voxels", 0) or 0)
    if et_min_voxels > server_n:
        record["et_min_voxels"] = et_min_voxels
        record["post_processing"] = (
            volume.describe_et_to_necrosis(et_min_voxels) + ", applied by the client"
        )
    return record


def send_grpc(target: str, request, timeout: float = 600.0):
    """Sends a PredictRequest to ``host:port``; the message limits allow a whole case."""
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    with grpc.insecure_channel(target, options=options) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        try:
            return stub.Predict(request, timeout=timeout)
        except grpc.RpcError as e:
            detail = str(e.details()).replace("\n", " ")[:500]
            raise RuntimeError(f"{target}: gRPC {e.code().name}: {detail}") from None


# ------------------------------------------------------------- command line
@dataclasses.dataclass(frozen=True)
class ClientConfig:
    """What ``python -m serving.client`` does; built from its flags."""

    case_dir: str
    output_dir: str
    server: str = "http://localhost:8501"
    grpc_server: str = "localhost:8500"
    protocol: str = "rest"
    model_name: str = "brats"
    version: int | None = None
    signature_name: str = "serving_default"
    case_id: str | None = None
    timeout_s: float = 600.0
    overwrite: bool = False
    et_min_voxels: int = 0

    def __post_init__(self):
        volume.check_et_min_voxels(self.et_min_voxels)
        if self.protocol not in ("rest", "grpc"):
            raise ValueError(f"protocol must be 'rest' or 'grpc', got {self.protocol!r}")
        _check_signature(self.signature_name)
        if not self.case_dir or not self.output_dir:
            raise ValueError("--case_dir and --output_dir are required")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s!r}")


def run(config: ClientConfig) -> pathlib.Path:
    """Reads the case, asks the server, writes ``<output_dir>/<case_id>.nii.gz``
    and its protocol ``<output_dir>/<case_id>.json``."""
    case_id = config.case_id or pathlib.Path(config.case_dir).name
    out_dir = pathlib.Path(config.output_dir)
    if not out_dir.is_dir():
        raise FileNotFoundError(f"case {case_id}: output directory not found: {out_dir}")
    target = out_dir / f"{case_id}.nii.gz"
    record_path = out_dir / f"{case_id}.json"
    for path in (target, record_path):
        if path.exists() and not config.overwrite:  # fail before the long request
            raise FileExistsError(f"case {case_id}: {path} exists (use --overwrite)")
    image, reference = load_case(config.case_dir, case_id)
    if config.protocol == "rest":
        url = server = rest_url(config.server, config.model_name, config.version)
        reply = send_rest(url, rest_request(image, config.signature_name), config.timeout_s)
        try:
            outputs = decode_rest_response(reply)
        except (ValueError, RuntimeError) as e:  # JSON, but not a predict response
            raise RuntimeError(f"{url}: {e}") from None
    else:
        server = config.grpc_server
        request = grpc_request(image, config.model_name, config.signature_name, config.version)
        outputs = decode_grpc_response(send_grpc(config.grpc_server, request, config.timeout_s))
    labels = outputs["labels"]
    if labels.shape != (1,) + image.shape[:3]:
        raise ValueError(
            f"case {case_id}: server returned labels of shape {labels.shape}, "
            f"expected {(1,) + image.shape[:3]}"
        )
    et_label = constants.LABEL_ET_2023 if constants.LABEL_ET_2023 in labels else constants.LABEL_ET
    label_map = volume.et_to_necrosis(labels[0], config.et_min_voxels, et_label)
    record = {
        "case_id": case_id,
        "prediction": target.name,
        "server": server,
        "model_name": config.model_name,
        "version": config.version,
        "signature": config.signature_name,
        "protocol": case_protocol(outputs.get("protocol"), config.et_min_voxels),
    }
    written = write_prediction_nifti(
        label_map, reference, target, case_id=case_id, et_label=et_label, overwrite=config.overwrite
    )
    write_text_atomic(record_path, json.dumps(record, indent=1) + "\n")
    return written


def define_flags():
    """Defines this entry point's flags (only when run as a program)."""
    from absl import flags

    flags.DEFINE_string("case_dir", None, "Directory with <case>_{t1,t1ce,t2,flair}.nii.gz.")
    flags.DEFINE_string("case_id", None, "Case id (default: the case directory's name).")
    flags.DEFINE_string("output_dir", None, "Directory for <case>.nii.gz (must exist).")
    flags.DEFINE_enum("protocol", "rest", ["rest", "grpc"], "How to talk to TF Serving.")
    flags.DEFINE_string("server", "http://localhost:8501", "TF Serving REST address.")
    flags.DEFINE_string("grpc_server", "localhost:8500", "TF Serving gRPC host:port.")
    flags.DEFINE_string("model_name", "brats", "--model_name given to tensorflow_model_server.")
    flags.DEFINE_integer(
        "version", None, "Model version (default: the server's latest).", lower_bound=1
    )
    flags.DEFINE_enum(
        "signature",
        "serving_default",
        list(SIGNATURES),
        "serving_tta averages the 8 mirror flips (8x slower).",
    )
    flags.DEFINE_float("timeout_s", 600.0, "Request timeout in seconds.", lower_bound=1.0)
    flags.DEFINE_bool("overwrite", False, "Replace an existing prediction file.")
    flags.DEFINE_integer(
        "et_min_voxels",
        0,
        "Post-processing here, not the paper's (0: off): "
        "a case whose predicted ET has fewer voxels gets necrosis (label 1) "
        "there; as a SavedModel exported with --et_min_voxels.",
        lower_bound=0,
    )


def main(argv):
    from absl import flags

    if len(argv) > 1:
        sys.exit(f"serving.client: error: unexpected arguments {argv[1:]}")
    f = flags.FLAGS
    try:
        config = ClientConfig(
            case_dir=f.case_dir,
            output_dir=f.output_dir,
            server=f.server,
            grpc_server=f.grpc_server,
            protocol=f.protocol,
            model_name=f.model_name,
            version=f.version,
            signature_name=f.signature,
            case_id=f.case_id,
            timeout_s=f.timeout_s,
            overwrite=f.overwrite,
            et_min_voxels=f.et_min_voxels,
        )
        path = run(config)
    except (OSError, ValueError, RuntimeError) as e:
        sys.exit(f"serving.client: error: {e}")
    print(f"wrote {path} and {path.with_name(path.name[: -len('.nii.gz')] + '.json')}")


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main)
