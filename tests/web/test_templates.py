"""coordinator/web/templates.py: filling task-type templates from a submission. Pure; no I/O."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from coordinator.web.templates import (
    DEFAULT_PATH,
    TemplateError,
    Templates,
    apply_template,
    load_templates,
    templates_path,
)
from shared.tasks import TaskSubmit, executor_for, split_submission

ROOT = Path(__file__).resolve().parents[2]

SMALL = """
[llm_inference]
image = "vllm:{version}"
command = ["serve", "--model", "{model}", "--prompt={prompt}", "{{literal}}"]
env = { MODEL = "{model}", TOKENS = "{max_tokens}", FIXED = "x" }
timeout_s = 60
shm_size = "8g"
volumes = ["/cache:/root/.cache"]

[llm_inference.params]
version = "1"
max_tokens = 128

[llm_inference.requirements]
gpu_count = 1
memory_gb = 16

[training]
image = "torch"
script = "train --epochs {epochs} --name {run_name}"

[training.params]
epochs = 1
"""


@pytest.fixture
def small(tmp_path: Path) -> Templates:
    path = tmp_path / "t.toml"
    path.write_text(SMALL)
    return load_templates(path)


def fill(templates: Templates, **body: Any) -> tuple[TaskSubmit, dict[str, Any]]:
    spec, params = split_submission(body)
    return apply_template(spec, params, templates)


def test_placeholders_filled_from_the_submission_and_defaults(small: Templates) -> None:
    spec, params = fill(small, task_type="llm_inference", model="llama2-7b", prompt="hi there")
    assert spec.image == "vllm:1"
    assert spec.command == ["serve", "--model", "llama2-7b", "--prompt=hi there", "{literal}"]
    assert spec.env == {"MODEL": "llama2-7b", "TOKENS": "128", "FIXED": "x"}
    assert (spec.timeout_s, spec.shm_size, spec.volumes) == (60, "8g", ["/cache:/root/.cache"])
    assert spec.requirements.gpu_count == 1 and spec.requirements.memory_gb == 16
    assert params == {"version": "1", "max_tokens": 128, "model": "llama2-7b", "prompt": "hi there"}
    assert executor_for(spec) == "docker"


def test_values_are_text_one_argv_element_each(small: Templates) -> None:
    prompt = 'a "quoted" $(rm -rf /); {x} `y`'
    spec, _ = fill(small, task_type="llm_inference", model="m", prompt=prompt, max_tokens=5,
                   version=2)
    assert spec.command is not None and spec.command[3] == f"--prompt={prompt}"
    assert spec.env["TOKENS"] == "5" and spec.image == "vllm:2"
    spec, _ = fill(small, task_type="llm_inference", model=["a", 1], prompt={"k": True})
    assert spec.env["MODEL"] == '["a",1]' and spec.command is not None
    assert spec.command[3] == '--prompt={"k":true}'


def test_script_values_are_shell_quoted(small: Templates) -> None:
    spec, _ = fill(small, task_type="training", run_name="x; touch /pwned", epochs=3)
    assert spec.script == "train --epochs 3 --name 'x; touch /pwned'"


def test_the_submission_s_explicit_fields_win(small: Templates) -> None:
    spec, _ = fill(
        small, task_type="llm_inference", model="m", prompt="p", image="mine:2",
        command=["my", "argv"], env={"MODEL": "other", "NEW": "1"}, timeout_s=5,
        shm_size="1g", volumes=["/a:/b:ro"], requirements={"gpu_type": "A100", "memory_gb": 40},
    )
    assert spec.image == "mine:2" and spec.command == ["my", "argv"] and spec.script is None
    assert spec.env == {"MODEL": "other", "TOKENS": "128", "FIXED": "x", "NEW": "1"}
    assert (spec.timeout_s, spec.shm_size, spec.volumes) == (5, "1g", ["/a:/b:ro"])
    req = spec.requirements
    assert (req.gpu_count, req.memory_gb, req.gpu_type) == (1, 40, "A100")  # unset: template's


def test_a_script_replaces_the_template_command(small: Templates) -> None:
    spec, _ = fill(small, task_type="llm_inference", model="m", script="echo {not a field}")
    assert spec.command is None and spec.script == "echo {not a field}"  # no prompt needed now


def test_missing_placeholder_is_an_error_naming_it(small: Templates) -> None:
    with pytest.raises(TemplateError, match=r"llm_inference needs `prompt`"):
        fill(small, task_type="llm_inference", model="m")
    with pytest.raises(TemplateError, match=r"needs `model`, `prompt`: give them"):
        fill(small, task_type="llm_inference")
    with pytest.raises(ValueError, match="prompt"):  # a ValueError, as validation errors are
        fill(small, task_type="llm_inference", model="m")


def test_types_without_template(small: Templates) -> None:
    spec, params = fill(small, task_type="custom", script="echo {x}", x=1)
    assert spec.script == "echo {x}" and params == {"x": 1} and executor_for(spec) == "process"
    spec, _ = fill(small, task_type="custom", image="busybox", script="true")
    assert executor_for(spec) == "docker"
    spec, _ = fill(small, task_type="embeddings", image="enc:1", command=["embed"])
    assert spec.image == "enc:1"  # no template, but the submission says what to run
    with pytest.raises(TemplateError, match="no template for task type embeddings"):
        fill(small, task_type="embeddings", texts=["a"])


def test_a_filled_template_is_validated_again(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text('[training]\nimage = "x"\ncommand = ["{a}"]\ntimeout_s = -1\n')
    with pytest.raises(TemplateError, match=r"timeout_s"):
        fill(load_templates(path), task_type="training", a="b")


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('[training]\ncommand = ["x"]\n', "missing required field `image`"),
        ('[training]\nimage = "x"\nbogus = 1\n', "unknown field `bogus`"),
        ('[training]\nimage = "x"\ncommand = ["{a.b}"]\n', "use {name} only"),
        ('[training]\nimage = "x"\ncommand = ["{a!r}"]\n', "use {name} only"),
        ('[training]\nimage = "x"\nscript = "echo {"\n', "bad placeholder"),
        ('[training]\nimage = "x"\nscript = "a"\ncommand = ["b"]\n', "not both"),
        ("[training\n", "templates file"),
    ],
)
def test_malformed_templates_file(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "t.toml"
    path.write_text(text)
    with pytest.raises(TemplateError, match=re.escape(needle)):
        load_templates(path)


def test_missing_file_is_a_template_error(tmp_path: Path) -> None:
    with pytest.raises(TemplateError, match="nope.toml"):
        load_templates(tmp_path / "nope.toml")


def test_path_from_env() -> None:
    assert templates_path({}) == DEFAULT_PATH
    assert templates_path({"MESH_TEMPLATES": "/etc/gpumesh/t.toml"}) == Path("/etc/gpumesh/t.toml")


def test_packaged_defaults_cover_the_template_types_and_match_the_profile_copy() -> None:
    assert (ROOT / "profiles" / "templates.toml").read_text() == DEFAULT_PATH.read_text()
    templates = load_templates()
    assert set(templates) == {"llm_inference", "training", "embeddings"}
    # The seed's llm_inference example fills with defaults only.
    spec, params = fill(templates, task_type="llm_inference", model="llama2-7b", prompt="hi")
    assert spec.env["MODEL"] == "llama2-7b" and spec.env["PROMPT"] == "hi"
    assert spec.requirements.gpu_count == 1 and spec.image and spec.command
    assert params["max_tokens"] == 256
    spec, _ = fill(templates, task_type="training", epochs=3)
    assert spec.env["EPOCHS"] == "3" and spec.env["MODEL"] == "resnet18"
    spec, _ = fill(templates, task_type="embeddings", texts=["a", "b"])
    assert spec.env["TEXTS"] == '["a","b"]'
    # Every placeholder has a default: the seed's examples leave prompt and texts out.
    spec, params = fill(templates, task_type="embeddings")
    assert spec.env["TEXTS"] == '["gpumesh embeddings smoke test"]' and params["batch_size"] == 32
    spec, _ = fill(templates, task_type="llm_inference")
    assert spec.env["PROMPT"]
    for name, tpl in templates.items():
        assert tpl.placeholders() <= set(tpl.params) | {"model"}, name
