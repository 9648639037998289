"""The CRD's schema and CEL rules on good and bad pools (cel-python, jsonschema).

Each bad pool breaks one thing; the test checks that the generated CRD rejects it — the
structural schema by JSON Schema validation (unknown fields rejected, as
``kubectl --validate=strict`` does), the CEL rules with cel-python on the defaulted
pool, as the API server evaluates them — and that the operator's loader agrees.
"""

from __future__ import annotations

import copy
from typing import Any

import jsonschema
import pytest

from kvpool.operator import api, crd, schema, validation
from tests.operator.test_children import CASES


def strict(node: dict[str, Any]) -> dict[str, Any]:
    """The CRD schema as strict JSON Schema: objects with properties allow nothing else."""
    node = copy.deepcopy(node)
    stack = [node]
    while stack:
        n = stack.pop()
        if n.get("type") == "object" and "properties" in n and "additionalProperties" not in n:
            n["additionalProperties"] = False
        stack.extend(n.get("properties", {}).values())
        for key in ("items", "additionalProperties"):
            if isinstance(n.get(key), dict):
                stack.append(n[key])
    return node


ROOT = crd.kvcachepool_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
VALIDATOR = jsonschema.Draft7Validator(strict(ROOT))


def pool(spec: dict[str, Any], name: str = "demo") -> dict[str, Any]:
    return {"apiVersion": api.API_VERSION, "kind": api.KIND,
            "metadata": {"name": name, "namespace": "default"}, "spec": spec}


def defaulted(obj: dict[str, Any]) -> dict[str, Any]:
    """What the API server stores: the spec with the schema's defaults filled in."""
    return {**obj, "spec": schema.dump(api.load_spec(obj["spec"]))}


def with_(base: str, **changes: Any) -> dict[str, Any]:
    spec = copy.deepcopy(CASES[base])
    for dotted, value in changes.items():
        node = spec
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return spec


@pytest.mark.parametrize("case", sorted(CASES))
def test_good_pools_pass_schema_and_cel(case: str) -> None:
    obj = pool(CASES[case])
    VALIDATOR.validate(obj)
    VALIDATOR.validate(defaulted(obj))
    assert validation.violations(defaulted(obj)) == []


CLAIM = {"persistentVolumeClaim": {"claimName": "kv-profiles"}}
IMAGE = {"image": {"reference": "registry.example/profiles/smollm:v1"}}


def with_profile(profile: dict[str, Any], **transfer: Any) -> dict[str, Any]:
    return with_("minimal", transfer__profile=profile,
                 **{f"transfer__{k}": v for k, v in transfer.items()})


CEL_BAD = {
    "decode-zero": (with_("minimal", decode__replicas=0), "decode.replicas must be at least 1"),
    "nixl-on-cpu": (with_("minimal", transfer__transport="nixl", decode__gpus=0),
                    "transport nixl needs a GPU"),
    "chunk-not-multiple": (with_("minimal", transfer__chunkTokens=100),
                           "chunkTokens must be a multiple of blockSize"),
    "raw-with-level": (with_("minimal", transfer__codec="raw", transfer__level="low"),
                       "cachegen codec only"),
    "raw-lossless": (with_("minimal", transfer__codec="raw", transfer__lossless=True),
                     "cachegen codec only"),
    "gpu-in-resources": (with_("minimal", decode__resources={"limits": {"nvidia.com/gpu": 1}}),
                         "GPUs are set with the role's gpus field"),
    "secret-without-mtls": (with_("minimal", transfer__tls={"mode": "plaintext",
                                                            "secretName": "certs"}),
                            "secretName applies to mode mTLS only"),
    "gpu-in-sidecar": (with_("minimal", sidecar__resources={"requests": {"nvidia.com/gpu": 1}}),
                       "GPUs are set with the role's gpus field"),
    "profile-with-raw": (with_profile({**CLAIM, "path": "m.kvprofile"}, codec="raw"),
                         "profile applies to the lossy levels of the cachegen codec only"),
    "profile-lossless": (with_profile({**CLAIM, "path": "m.kvprofile"}, lossless=True),
                         "profile applies to the lossy levels of the cachegen codec only"),
    "profile-no-source": (with_profile({"path": "m.kvprofile"}),
                          "profile needs exactly one source: persistentVolumeClaim or image"),
    "profile-two-sources": (with_profile({**CLAIM, **IMAGE, "path": "m.kvprofile"}),
                            "profile needs exactly one source"),
    "profile-absolute-path": (with_profile({**CLAIM, "path": "/models/m.kvprofile"}),
                              "path is relative to the volume's root"),
    "profile-path-up": (with_profile({**IMAGE, "path": "../m.kvprofile"}),
                        "path must stay inside the volume: no .. segment"),
    "profile-path-up-inside": (with_profile({**CLAIM, "path": "a/../../m.kvprofile"}),
                               "no .. segment"),
    "profile-empty-path": (with_profile({**CLAIM, "path": ""}),
                           "path names a file inside the volume"),
    "profile-directory": (with_profile({**CLAIM, "path": "profiles/"}),
                          "path names a file inside the volume"),
}


@pytest.mark.parametrize("case", sorted(CEL_BAD))
def test_cel_rules_reject_bad_pools(case: str) -> None:
    spec, message = CEL_BAD[case]
    obj = defaulted(pool(spec))
    VALIDATOR.validate(obj)  # structurally fine: only a CEL rule can catch it
    found = validation.violations(obj)
    assert [v for v in found if message in v.message], found
    assert len(found) == 1, found


def test_profile_violations_name_the_field() -> None:
    found = validation.violations(defaulted(pool(CEL_BAD["profile-absolute-path"][0])))
    assert [v.path for v in found] == ["spec.transfer.profile.path"]
    found = validation.violations(defaulted(pool(CEL_BAD["profile-with-raw"][0])))
    assert [v.path for v in found] == ["spec.transfer.profile"]


@pytest.mark.parametrize("path", ["m.kvprofile", "llama/v1.kvprofile", "a..b/..c.kvprofile",
                                  "./m.kvprofile"])
def test_profile_paths_inside_the_volume_pass(path: str) -> None:
    for source in (CLAIM, IMAGE):
        obj = defaulted(pool(with_profile({**source, "path": path}, level="default")))
        VALIDATOR.validate(obj)
        assert validation.violations(obj) == []


def test_name_length_rule() -> None:
    found = validation.violations(defaulted(pool(CASES["minimal"], name="x" * 47)))
    assert [v.message for v in found] == [
        (f"metadata.name must be at most {api.MAX_NAME_LENGTH} characters "
        "(the children's names add suffixes to it)")]
    assert validation.violations(defaulted(pool(CASES["minimal"], name="x" * 46))) == []


def test_every_cel_rule_can_fail() -> None:
    """No rule in the CRD is dead: each is broken by some bad pool above."""
    broken = {v.rule for spec, _ in CEL_BAD.values()
              for v in validation.violations(defaulted(pool(spec)))}
    broken |= {v.rule for v in validation.violations(
        defaulted(pool(CASES["minimal"], name="x" * 47)))}
    assert set(validation.all_rules()) == broken


SCHEMA_BAD = {
    "unknown-transport": (with_("minimal", transfer__transport="rdma"), "spec.transfer.transport"),
    "negative-replicas": (with_("minimal", prefill__replicas=-1), "spec.prefill.replicas"),
    "level-number": (with_("minimal", transfer__level="2"), "spec.transfer.level"),
    "tiny-chunks": (with_("minimal", transfer__chunkTokens=8), "spec.transfer.chunkTokens"),
    "replicas-string": (with_("minimal", decode__replicas="3"), "spec.decode.replicas"),
    "unknown-field": (with_("minimal", decode__replica=3), "spec.decode"),
    "too-many-gpus": (with_("minimal", decode__gpus=17), "spec.decode.gpus"),
    "bad-service-type": (with_("minimal", router__serviceType="Ingress"),
                         "spec.router.serviceType"),
    "quantity-bool": (with_("minimal", decode__resources={"requests": {"cpu": True}}),
                      "spec.decode.resources.requests.cpu"),
    "profile-without-path": (with_profile(CLAIM), "spec.transfer.profile.path"),
    "profile-claim-name": (with_profile({"persistentVolumeClaim": {"claimName": "My_Claim"},
                                         "path": "m.kvprofile"}),
                           "spec.transfer.profile.persistentVolumeClaim.claimName"),
    "profile-pull-policy": (with_profile({"image": {"reference": "r/p:v1",
                                                    "pullPolicy": "Sometimes"},
                                          "path": "m.kvprofile"}),
                            "spec.transfer.profile.image.pullPolicy"),
    "profile-hostpath": (with_profile({"hostPath": {"path": "/srv"}, "path": "m.kvprofile"}),
                         "spec.transfer.profile"),
}


@pytest.mark.parametrize("case", sorted(SCHEMA_BAD))
def test_schema_rejects_bad_pools_and_so_does_the_loader(case: str) -> None:
    spec, path = SCHEMA_BAD[case]
    with pytest.raises(jsonschema.ValidationError):
        VALIDATOR.validate(pool(spec))
    with pytest.raises(schema.SpecError) as err:
        api.load_spec(spec)
    assert err.value.path == path


def test_missing_model_is_reported_by_both() -> None:
    spec = {"image": "vllm/vllm-openai:v0.11.0"}
    with pytest.raises(jsonschema.ValidationError, match="'model' is a required property"):
        VALIDATOR.validate(pool(spec))
    with pytest.raises(schema.SpecError, match="spec.model: is required"):
        api.load_spec(spec)
