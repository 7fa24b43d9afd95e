"""
The poor man's configurator (nanoGPT's idea), strict:

    python train.py config/quick_cpu.py --residual=mhc --batch_size=8

Each argument is either a config file (Python assignments, applied in order) or --key=value.
A key must already exist in the defaults, and a value must parse as the default's type:
booleans only from true/false/True/False/1/0 (so --wandb_log=false is never silently True),
integers as integers, floats as any number. Anything else raises ConfigError with one line.
--help (or -h) prints the script's docstring and its settings, each with its default and the
comment written beside it in the script's defaults.
"""
import ast
import difflib
import os
import re
import sys

TRUE, FALSE = ("true", "True", "1"), ("false", "False", "0")


class ConfigError(Exception):
    pass


def die(msg):
    """Stop with one clear line instead of a traceback (printed once, by rank 0, under torchrun)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def settings(defaults, argv, check=None, allow_files=True):
    """A script's settings: its defaults updated from argv (configure), then check(c), which
    returns a problem or None. A problem stops the script with one line."""
    c = dict(defaults)
    try:
        configure(c, argv, allow_files)
        problem = check(c) if check else None
    except ConfigError as e:
        problem = e
    if problem:
        die(problem)
    return c


def at_least(c, keys, low=1, note=""):
    """The first of `keys` whose value is below `low`, as one line, or None."""
    for key in keys:
        if c[key] < low:
            return f"--{key}={c[key]} must be at least {low}{note}"
    return None


def not_a_folder(c, key, holds):
    """A line if --key names an existing file where a folder (for `holds`) belongs, or None."""
    if c[key] and os.path.exists(c[key]) and not os.path.isdir(c[key]):
        return f"--{key}={c[key]} is a file, not a folder; name a folder for {holds}"
    return None


def _unknown(key, config):
    close = difflib.get_close_matches(key, list(config), n=1)
    hint = f" (did you mean --{close[0]}?)" if close else ""
    return ConfigError(f"unknown option --{key}{hint}")


def parse_value(key, text, default):
    """Turn the command-line string `text` into the type of `default`."""
    if isinstance(default, bool):
        if text in TRUE:
            return True
        if text in FALSE:
            return False
        raise ConfigError(f"--{key}={text}: expected true or false")
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"--{key}={text}: expected an integer")
    if isinstance(default, float):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"--{key}={text}: expected a number")
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = ast.literal_eval(text)  # --start="'hello'" style quoting
    return text


def check_type(key, value, default):
    """A value set in a config file must have the default's type (an int is fine for a float)."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = type(value) is type(default)
    if not ok:
        raise ConfigError(f"{key}={value!r}: expected a {type(default).__name__}")
    return float(value) if isinstance(default, float) else value


def help_text(config, allow_files=True):
    """The running script's docstring, then every setting with its default and its comment (the
    `# ...` on the line `key=value,  # ...` of the script's defaults)."""
    main = sys.modules["__main__"]
    comments = {}
    with open(main.__file__, encoding="utf-8") as f:
        for line in f:
            m = re.match(r"\s*\"?(\w+)\"?\s*[=:][^#]*#\s*(.*)", line)
            if m and m.group(1) in config:
                comments.setdefault(m.group(1), m.group(2).strip())
    usage = "settings: --key=value" + (", or a config file of key = value lines (config/*.py)" if allow_files else "")
    plain = lambda v: isinstance(v, str) and v and v.isprintable() and " " not in v  # noqa: E731
    shown = {k: v if plain(v) else repr(v) for k, v in config.items()}  # --out_dir=out, but --start='\n'
    width = max(len(f"--{k}={v}") for k, v in shown.items())
    rows = [f"  {f'--{k}={v}':<{width}}  {comments.get(k, '')}".rstrip() for k, v in shown.items()]
    return "\n".join([(main.__doc__ or "").strip(), "", usage + " (defaults shown):", *rows])


def configure(config, argv, allow_files=True):
    """Update the dict `config` in place from argv; returns the keys that were set.
    --help or -h prints help_text and exits."""
    if "--help" in argv or "-h" in argv:
        print(help_text(config, allow_files))
        sys.exit(0)
    changed = []
    for arg in argv:
        if not arg.startswith("--"):
            if not allow_files:
                raise ConfigError(f"unexpected argument {arg!r}; options are --key=value")
            if not os.path.isfile(arg):
                raise ConfigError(f"config file {arg} not found (options are written --key=value)")
            namespace = {}
            try:
                with open(arg, encoding="utf-8") as f:
                    exec(compile(f.read(), arg, "exec"), {}, namespace)
            except SyntaxError as e:
                raise ConfigError(f"{arg}, line {e.lineno}: {e.msg} (a config file is Python: key = value lines)")
            except Exception as e:  # NameError, a bad expression, not UTF-8 ...
                raise ConfigError(f"{arg}: {type(e).__name__}: {e}")
            for key, value in namespace.items():
                if key.startswith("_") or callable(value) or type(value).__name__ == "module":
                    continue
                if key not in config:
                    raise ConfigError(f"{arg}: {_unknown(key, config)}")
                config[key] = check_type(key, value, config[key])
                changed.append(key)
            continue
        key, eq, text = arg[2:].partition("=")
        if not eq:
            raise ConfigError(f"{arg}: options are written --key=value")
        if key not in config:
            raise _unknown(key, config)
        config[key] = parse_value(key, text, config[key])
        changed.append(key)
    return changed
