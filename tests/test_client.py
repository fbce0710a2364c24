"""serving/client.py: request building and response decoding, fed through the SavedModel."""

import http.server
import json
import pathlib
import subprocess
import sys
import threading

import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf
from serving_fixtures import tiny_export

from brats_tf import inference as I
from data_pipeline import constants as C
from serving import client

REPO = pathlib.Path(__file__).resolve().parents[1]
CASE = "Brats18_TEST_1"
SHAPE = (20, 28, 13)  # not divisible by 8
AFFINE = np.array([[-1.0, 0, 0, 90], [0, -1.0, 0, 126], [0, 0, 1.0, -72], [0, 0, 0, 1]])


@pytest.fixture
def case_dir(tmp_path):
    rng = np.random.default_rng(11)
    d = tmp_path / CASE
    d.mkdir()
    brain = np.zeros(SHAPE, bool)
    brain[2:18, 3:25, 1:12] = True
    for i, modality in enumerate(C.MODALITIES):
        data = np.where(brain, rng.uniform(100, 900, SHAPE) * (i + 1), 0).astype(np.int16)
        img = nib.Nifti1Image(data, AFFINE)
        img.set_qform(AFFINE, 1)
        img.set_sform(AFFINE, 1)
        nib.save(img, d / f"{CASE}_{modality}.nii.gz")
    return d


def serve(loaded, signature_name, inputs):
    """What tensorflow_model_server does with a request's input: the loaded
    signature (string outputs as text, as its REST API returns them)."""
    out = loaded.signatures[signature_name](image=tf.constant(np.asarray(inputs, np.float32)))
    out = {k: v.numpy() for k, v in out.items()}
    out["protocol"] = np.array([t.decode() for t in out["protocol"]])
    return out


def test_load_case_channel_order_and_errors(case_dir, tmp_path):
    image, reference = client.load_case(case_dir)
    assert image.shape == SHAPE + (4,) and image.dtype == np.float32
    for i, modality in enumerate(C.MODALITIES):
        raw = np.asarray(nib.load(case_dir / f"{CASE}_{modality}.nii.gz").dataobj)
        np.testing.assert_array_equal(image[..., i], raw)
    np.testing.assert_allclose(reference.affine, AFFINE)
    (case_dir / f"{CASE}_t2.nii.gz").rename(tmp_path / "t2_elsewhere.nii.gz")
    with pytest.raises(FileNotFoundError, match=f"case {CASE}: missing .*{CASE}_t2.nii.gz"):
        client.load_case(case_dir)
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 5), np.int16), AFFINE), case_dir / f"{CASE}_t2.nii.gz")
    with pytest.raises(ValueError, match=rf"case {CASE}: .*_t2.nii.gz has shape \(5, 5, 5\)"):
        client.load_case(case_dir)


def test_case_files_brats2023_naming(tmp_path):
    d = tmp_path / "BraTS-GLI-00001-000"
    d.mkdir()
    for i, modality in enumerate(C.MODALITIES_2023):
        nib.save(
            nib.Nifti1Image(np.full((3, 4, 5), i + 1, np.int16), AFFINE),
            d / f"{d.name}-{modality}.nii.gz",
        )
    files = client.case_files(d)
    assert list(files) == list(C.MODALITIES)
    assert [p.name for p in files.values()] == [f"{d.name}-{m}.nii.gz" for m in C.MODALITIES_2023]
    image, _ = client.load_case(d)
    np.testing.assert_array_equal(image[0, 0, 0], [1, 2, 3, 4])
    (d / f"{d.name}-t2w.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match=f"missing .*{d.name}-t2w.nii.gz"):
        client.case_files(d)


@pytest.mark.parametrize("fmt", client.REST_FORMATS)
@pytest.mark.parametrize("signature_name", client.SIGNATURES)
def test_rest_request_through_saved_model(case_dir, fmt, signature_name):
    model, _, _, loaded = tiny_export()
    image, _ = client.load_case(case_dir)
    body = json.loads(json.dumps(client.rest_request(image, signature_name, fmt)))
    assert body["signature_name"] == signature_name
    inputs = (
        body["inputs"]["image"] if fmt == "inputs" else [row["image"] for row in body["instances"]]
    )
    np.testing.assert_array_equal(np.asarray(inputs, np.float32), image[None])
    out = serve(loaded, signature_name, inputs)
    # TF Serving's two REST response forms
    response = (
        {"outputs": {k: v.tolist() for k, v in out.items()}}
        if fmt == "inputs"
        else {"predictions": [{k: v[0].tolist() for k, v in out.items()}]}
    )
    decoded = client.decode_rest_response(json.dumps(response))
    assert decoded["labels"].shape == (1,) + SHAPE and decoded["labels"].dtype == np.uint8
    assert decoded["probabilities"].shape == (1,) + SHAPE + (3,)
    assert decoded["protocol"]["tta"] == (
        "8 mirror flips" if signature_name == "serving_tta" else "none"
    )
    # independent path: Keras model + NumPy pre-processing
    probs = I.predict_volume(model, image, tta=signature_name == "serving_tta")
    np.testing.assert_allclose(decoded["probabilities"][0], probs, atol=2e-5)
    clear = np.all(np.abs(probs - 0.5) > 1e-4, axis=-1)
    np.testing.assert_array_equal(
        decoded["labels"][0][clear], I.probabilities_to_labels(probs)[clear]
    )


def test_grpc_request_through_saved_model(case_dir):
    pytest.importorskip("tensorflow_serving")
    from tensorflow_serving.apis import predict_pb2

    _, _, _, loaded = tiny_export()
    image, _ = client.load_case(case_dir)
    request = client.grpc_request(image, "brats", "serving_default", version=3)
    request = predict_pb2.PredictRequest.FromString(request.SerializeToString())
    assert request.model_spec.name == "brats" and request.model_spec.version.value == 3
    assert request.model_spec.signature_name == "serving_default"
    assert list(request.output_filter) == ["labels", "protocol"]
    sent = tf.make_ndarray(request.inputs["image"])
    assert sent.dtype == np.float32
    np.testing.assert_array_equal(sent, image[None])
    out = serve(loaded, "serving_default", sent)
    response = predict_pb2.PredictResponse()
    response.outputs["labels"].CopyFrom(tf.make_tensor_proto(out["labels"]))
    response.outputs["protocol"].CopyFrom(tf.make_tensor_proto(out["protocol"].astype(bytes)))
    decoded = client.decode_grpc_response(
        predict_pb2.PredictResponse.FromString(response.SerializeToString())
    )
    np.testing.assert_array_equal(decoded["labels"], out["labels"])
    assert decoded["labels"].dtype == np.uint8 and "probabilities" not in decoded
    assert decoded["protocol"]["region"] == "brain_box"


def test_request_and_response_errors():
    with pytest.raises(ValueError, match=r"\(5, 5, 5, 3\)"):
        client.rest_request(np.zeros((5, 5, 5, 3)))
    with pytest.raises(ValueError, match="'serving_fast'"):
        client.rest_request(np.zeros((5, 5, 5, 4)), "serving_fast")
    with pytest.raises(RuntimeError, match="server error: bad input"):
        client.decode_rest_response('{"error": "bad input"}')
    with pytest.raises(ValueError, match="no 'labels'"):
        client.decode_rest_response({"outputs": {"probabilities": [[0.5]]}})
    assert client.rest_url("http://h:8501/", "brats") == "http://h:8501/v1/models/brats:predict"
    assert (
        client.rest_url("http://h:8501", "brats", 2)
        == "http://h:8501/v1/models/brats/versions/2:predict"
    )


class _FakeServing(http.server.BaseHTTPRequestHandler):
    """A loopback stand-in for tensorflow_model_server's REST predict API."""

    loaded = None
    paths = []
    outputs = ("labels", "probabilities", "protocol")

    def do_POST(self):  # the name http.server calls
        self.paths.append(self.path)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path != "/v1/models/brats:predict":
            self.send_response(404)
            reply = {"error": f"no model at {self.path}"}
        else:
            out = serve(self.loaded, body["signature_name"], body["inputs"]["image"])
            self.send_response(200)
            reply = {"outputs": {k: v.tolist() for k, v in out.items() if k in self.outputs}}
        data = json.dumps(reply).encode()
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_server():
    """Base URL of a loopback fake TF Serving that runs the tiny SavedModel."""
    _, _, _, loaded = tiny_export()
    _FakeServing.loaded = loaded
    _FakeServing.outputs = ("labels", "probabilities", "protocol")
    server = http.server.HTTPServer(("127.0.0.1", 0), _FakeServing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_client_run_end_to_end_over_loopback(case_dir, tmp_path, fake_server):
    _, _, _, loaded = tiny_export()
    out_dir = tmp_path / "preds"
    out_dir.mkdir()
    config = client.ClientConfig(
        case_dir=str(case_dir), output_dir=str(out_dir), server=fake_server, timeout_s=60
    )
    path = client.run(config)
    assert path == out_dir / f"{CASE}.nii.gz"
    written = nib.load(path)
    ref = nib.load(case_dir / f"{CASE}_t1.nii.gz")
    np.testing.assert_allclose(written.affine, ref.affine)
    assert written.shape == SHAPE and written.get_data_dtype() == np.uint8
    image, _ = client.load_case(case_dir)
    expected = serve(loaded, "serving_default", image[None])["labels"][0]
    np.testing.assert_array_equal(np.asarray(written.dataobj), expected)
    record = json.loads((out_dir / f"{CASE}.json").read_text())
    assert (
        record["protocol"]
        == json.loads((tiny_export()[2] / "assets.extra" / "brats_tf.json").read_text())["protocol"]
    )
    assert record["signature"] == "serving_default" and record["case_id"] == CASE
    with pytest.raises(FileExistsError, match="--overwrite"):
        client.run(config)
    wrong = client.ClientConfig(
        case_dir=str(case_dir),
        output_dir=str(out_dir),
        server=fake_server,
        model_name="other",
        overwrite=True,
    )
    with pytest.raises(RuntimeError, match="HTTP 404: .*no model at /v1/models/other"):
        client.run(wrong)


# serving.client as ``python -m serving.client``, then, on stderr's last line,
# whether TensorFlow was imported: a REST client needs only NumPy and nibabel.
_CLIENT = (
    "import atexit, runpy, sys\n"
    "atexit.register(lambda: print('tensorflow' in sys.modules, file=sys.stderr))\n"
    "sys.argv[0] = 'serving.client'\n"
    "runpy.run_module('serving.client', run_name='__main__', alter_sys=True)\n"
)


def test_client_command_line(case_dir, tmp_path, fake_server):
    out_dir = tmp_path / "cli"
    out_dir.mkdir()

    def cli(*args):
        result = subprocess.run(
            [sys.executable, "-c", _CLIENT, *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        *lines, imported_tf = result.stderr.strip().splitlines()
        assert imported_tf == "False", result.stderr[-2000:]  # REST: no TensorFlow
        return result, lines

    result, lines = cli(f"--case_dir={tmp_path / 'nope'}", f"--output_dir={out_dir}")
    assert result.returncode != 0
    assert lines[-1] == (
        f"serving.client: error: case nope: case directory not found: {tmp_path / 'nope'}"
    )
    result, _ = cli(f"--case_dir={case_dir}", f"--output_dir={out_dir}", f"--server={fake_server}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == (
        f"wrote {out_dir / (CASE + '.nii.gz')} and {out_dir / (CASE + '.json')}"
    )
    assert nib.load(out_dir / f"{CASE}.nii.gz").shape == SHAPE


def test_client_post_processing_equals_the_exported_one(case_dir, tmp_path, fake_server):
    """--et_min_voxels in the client on a plain SavedModel's labels = a SavedModel
    exported with it; the record says who applied it."""
    from brats_tf.export import export_saved_model

    model, _, _, loaded = tiny_export()
    image, _ = client.load_case(case_dir)
    plain = serve(loaded, "serving_default", image[None])["labels"][0]
    n = int((plain == C.LABEL_ET).sum()) + 1  # more than this case has: its ET goes
    assert n > 1  # the untrained model predicts some ET here: the test can fail
    exported = tf.saved_model.load(str(export_saved_model(model, tmp_path / "e", et_min_voxels=n)))
    served = serve(exported, "serving_default", image[None])
    out_dir = tmp_path / "preds"
    out_dir.mkdir()
    path = client.run(
        client.ClientConfig(
            case_dir=str(case_dir), output_dir=str(out_dir), server=fake_server, et_min_voxels=n
        )
    )
    by_client = np.asarray(nib.load(path).dataobj)
    np.testing.assert_array_equal(by_client, served["labels"][0])
    np.testing.assert_array_equal(by_client, np.where(plain == C.LABEL_ET, 1, plain))
    record = json.loads((out_dir / f"{CASE}.json").read_text())["protocol"]
    assert record["et_min_voxels"] == n and "applied by the client" in record["post_processing"]
    assert json.loads(served["protocol"][0])["et_min_voxels"] == n


def test_client_record_of_a_server_without_protocol(case_dir, tmp_path, fake_server):
    """A SavedModel exported before the protocol output: the labels are written
    and the record says the protocol is unknown."""
    _FakeServing.outputs = ("labels", "probabilities")
    out_dir = tmp_path / "preds"
    out_dir.mkdir()
    client.run(
        client.ClientConfig(case_dir=str(case_dir), output_dir=str(out_dir), server=fake_server)
    )
    record = json.loads((out_dir / f"{CASE}.json").read_text())
    assert list(record["protocol"]) == ["unknown"]
