"""Corral's sandbox bootstrap: the first process of every agent sandbox.

It is bind-mounted read-only from the host at ``/run/corral-boot/bootstrap.py`` and run by
the sandbox's own ``python3``, so it must work on every Python 3 an environment might hold:
standard library only, nothing newer than Python 3.6. It never changes with runner releases.

Wiring, set up by the host before this process starts:

* fd 0: the control channel, host -> sandbox, one JSON command per line;
* fd 1: the event channel, sandbox -> host, one JSON event per line;
* fd 2: the sandbox's log (raw stderr).

The first thing it does is move both channels off the standard descriptors, so that nothing
the agent starts can read commands or forge events by accident: stdin becomes /dev/null and
stdout joins stderr. Then it says hello and obeys, in order:

``{"op": "validate", "path": P, "package": "corral_runner", "requires": [3, 8]}``
    Compile every ``.py`` under ``P`` and import the package from there under a throwaway
    name; answer ``boot.validated`` or ``boot.invalid`` with the reason. Nothing is written.
``{"op": "run", "spec": {...}}``
    Import the runner from ``/opt/corral/runner``, close the event channel (from then on the
    bridge is the sandbox's only way out) and hand the runner the spec; exit with its status.

Its one optional argument names another runner home. Only the host sets it (argv is fixed
before anything in the sandbox runs), and only the unsandboxed test runtime does, whose
"sandbox" root is a directory on the host (``corral/sandbox/testing.py``).
"""

import json
import os
import sys

MYPY = False
if MYPY:  # type comments, not annotations: this file must parse on Python 3.6
    from typing import Any, List, Optional  # noqa: F401

RUNNER_HOME = "/opt/corral/runner"
STAGED_NAME = "_corral_staged_runner"


def main(runner_home=RUNNER_HOME):
    # type: (str) -> None
    sys.dont_write_bytecode = True  # the runner's directory is immutable; never litter it
    control = os.fdopen(os.dup(0), "rb")
    events = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(2, 1)
    os.close(devnull)

    def emit(kind, **data):
        # type: (str, Any) -> None
        data["type"] = kind
        line = (json.dumps(data) + "\n").encode()
        while line:
            line = line[os.write(events, line) :]

    emit("boot.ready", python=list(sys.version_info[:3]), executable=sys.executable)
    for raw in control:
        try:
            command = json.loads(raw.decode())
        except ValueError:
            emit("boot.invalid", error="unreadable command")
            continue
        op = command.get("op")
        if op == "validate":
            problem = validate(command["path"], command["package"], command["requires"])
            if problem:
                emit("boot.invalid", error=problem)
            else:
                emit("boot.validated", python=list(sys.version_info[:3]))
        elif op == "run":
            control.close()
            sys.path.insert(0, runner_home)
            import corral_runner.main as runner  # the freshly swapped runner

            sys.stdout.flush()
            if getattr(runner, "PROTOCOL", 1) >= 2:
                os.close(events)  # from here on the bridge is the only way out
                os._exit(runner.run(command["spec"]))
            os._exit(runner.run(command["spec"], events))
        else:
            emit("boot.invalid", error="unknown op %r" % (op,))
    os._exit(3)  # the host closed the control channel without a run: nothing ran


def validate(path, package, requires):
    # type: (str, str, List[int]) -> Optional[str]
    """None if the release at ``path`` compiles and imports here; else why not."""
    if tuple(sys.version_info[:2]) < tuple(requires):
        return "the release needs Python >= %s; this environment has %s" % (
            ".".join(map(str, requires)),
            ".".join(map(str, sys.version_info[:3])),
        )
    root = os.path.join(path, package)
    if not os.path.isfile(os.path.join(root, "__init__.py")):
        return "no package %s in %s" % (package, path)
    modules = []
    for directory, _, files in os.walk(root):
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            filename = os.path.join(directory, name)
            try:
                with open(filename, "rb") as source:
                    compile(source.read(), filename, "exec", dont_inherit=True)
            except (SyntaxError, ValueError) as exc:
                return "%s does not compile: %s" % (filename, exc)
            if name != "__init__.py" and directory == root:
                modules.append(name[:-3])
    try:
        import importlib
        import importlib.util

        spec = importlib.util.spec_from_file_location(
            STAGED_NAME, os.path.join(root, "__init__.py"), submodule_search_locations=[root]
        )
        if spec is None or spec.loader is None:
            return "cannot load %s" % root
        module = importlib.util.module_from_spec(spec)
        sys.modules[STAGED_NAME] = module
        spec.loader.exec_module(module)
        for name in modules:
            importlib.import_module(STAGED_NAME + "." + name)
    except BaseException as exc:  # any failure to import is a reason to refuse the release
        return "importing the release failed: %s: %s" % (type(exc).__name__, exc)
    finally:
        for name in [m for m in sys.modules if m.split(".")[0] == STAGED_NAME]:
            del sys.modules[name]
    return None


if __name__ == "__main__":
    main(*sys.argv[1:2])
