"""The boundary: the lesson at the top level, the plumbing behind one package, imports crossing one way."""
import ast
import inspect

import pytest

from conftest import REPO
from plumbing import errors

LESSON = {'main', 'main_fp16_optimizer', 'training', 'recipes', 'model', 'data', 'fp16_utils', 'generate',
          'grad_stats', 'plot'}


def project_imports(path):
    """The top-level project modules a file imports ('plumbing' for anything in the package)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split('.')[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split('.')[0])
    return names & (LESSON | {'plumbing'})


def test_the_top_level_holds_only_the_lesson_and_its_scripts():
    assert {p.stem for p in REPO.glob('*.py')} == LESSON


@pytest.mark.parametrize('path', sorted((REPO / 'plumbing').glob('*.py')), ids=lambda p: p.name)
def test_the_plumbing_imports_no_lesson_file_but_the_model(path):
    assert project_imports(path) - {'plumbing', 'model'} == set()


def test_model_imports_only_torch_and_its_plumbing_call():
    assert project_imports(REPO / 'model.py') == {'plumbing'}


def test_every_error_a_user_sees_carries_its_exit_code():
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if c is not errors.ExampleError]
    assert classes and all(issubclass(c, errors.ExampleError) for c in classes)
    assert {c.__name__: c.exit_code for c in classes} == {
        'UsageError': 2, 'CannotResume': 2, 'SaveInUse': 2, 'DataError': 1, 'CheckpointError': 1, 'WriteError': 1,
        'TrainingDiverged': 1, 'DistributedError': 1}


def test_library_code_raises_only_the_errors_family():
    """No module defines an exception class of its own outside plumbing/errors.py (signals aside: they are exits)."""
    for path in [*REPO.glob('*.py'), *(REPO / 'plumbing').glob('*.py')]:
        if path.name in ('errors.py', 'signals.py'):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = {getattr(b, 'id', getattr(b, 'attr', None)) for b in node.bases}
                assert not bases & {'Exception', 'BaseException', 'RuntimeError', 'ValueError'}, (path, node.name)


def test_training_loop_stays_short_and_shallow():
    source = (REPO / 'training.py').read_text()
    assert len(source.splitlines()) <= 200
    tree = ast.parse(source)
    train = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == 'train')
    assert train.end_lineno - train.lineno <= 40
