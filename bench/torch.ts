// PyTorch reference rows for the benches: runs tools/refs/lstm_bench.py with Debian's
// /usr/bin/python3 (python3-torch 1.13, CPU) on the seed classifier's shape and returns its
// rows, or why they are skipped (no torch there). Owns: nothing but that subprocess.
import { spawnSync } from "node:child_process"
import { fileURLToPath } from "node:url"

export interface TorchRow {
  readonly run: string
  readonly msPerStep: number
  readonly samplesPerSec: number
}

export const torchLstmRows = (steps: number): { rows: TorchRow[]; skipped?: string } => {
  const probe = spawnSync("/usr/bin/python3", ["-c", "import torch"], { encoding: "utf8" })
  if (probe.error !== undefined || probe.status !== 0) {
    const why = probe.error?.message ?? probe.stderr.trim().split("\n").pop()
    return { rows: [], skipped: `torch rows skipped: /usr/bin/python3 cannot import torch (${why}); apt-get install python3-torch` }
  }
  const script = fileURLToPath(new URL("../tools/refs/lstm_bench.py", import.meta.url))
  const r = spawnSync("/usr/bin/python3", [script, "--steps", String(steps)], { encoding: "utf8" })
  if (r.status !== 0) return { rows: [], skipped: `torch rows skipped: ${script} failed: ${r.stderr.trim().split("\n").pop()}` }
  return { rows: (JSON.parse(r.stdout) as { rows: TorchRow[] }).rows }
}
