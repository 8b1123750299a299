// Finds the line of a JSON text where a problem's `param` (a field path such as
// `training.optimizer.lr` or `model.layers[2]`) is written, so a message can sit at its field.

function segments(param) {
  return param.split(/[.[\]]+/).filter((s) => s !== "" && !/^\d+$/.test(s));
}

// The 0-based line of the last segment's key, searched for each segment after the previous
// one; null when the text does not name that field (e.g. a default the body left out).
export function lineOfParam(text, param) {
  if (!param) return null;
  let at = 0;
  for (const name of segments(param)) {
    const found = text.indexOf(JSON.stringify(name) + ":", at);
    const spaced = text.indexOf(JSON.stringify(name) + " :", at);
    const index = [found, spaced].filter((i) => i >= 0).sort((a, b) => a - b)[0];
    if (index === undefined) return null;
    at = index + 1;
  }
  return text.slice(0, at).split("\n").length - 1;
}

// Character range of a line, to select it in a textarea.
export function lineRange(text, line) {
  const lines = text.split("\n");
  const start = lines.slice(0, line).reduce((sum, l) => sum + l.length + 1, 0);
  return [start, start + (lines[line] ?? "").length];
}
