// Implements: choosing and initialising the TensorFlow.js compute backend, and the
// `Compute` Effect service that carries the choice.
// Owns: backend preference resolution (argument, then FLOTILLA_BACKEND, then auto),
// loading tfjs-node(-gpu) / wasm, registering Flotilla's kernels. Does not own: the
// kernels themselves (kernels.ts) or any model code.
//
// auto = "tensorflow" (native libtensorflow via @tensorflow/tfjs-node-gpu, then
// @tensorflow/tfjs-node, where installed) > "wasm" (SIMD, one thread under Node) > "cpu".
// tfjs' backend is process-global: the first initBackend decides, later calls with the
// same preference return the same BackendInfo object, and a call with another explicit
// preference switches the process to it (tests use this).

import { createRequire } from "node:module"
import path from "node:path"
import * as tf from "@tensorflow/tfjs"
import { Context, Data, Effect, Layer } from "effect"
import { registerKernels } from "./kernels.ts"

export type BackendName = "tensorflow" | "wasm" | "cpu"
export type BackendPreference = BackendName | "auto"

export interface BackendInfo {
  readonly name: BackendName
  /** Why this backend: what was tried and what failed, in one line for the start-up log. */
  readonly reason: string
}

export class BackendUnavailableError extends Data.TaggedError("BackendUnavailableError")<{
  readonly preference: BackendPreference
  readonly message: string
}> {}

const PREFERENCES: readonly BackendPreference[] = ["tensorflow", "wasm", "cpu", "auto"]

const INSTALL_TENSORFLOW =
  "install @tensorflow/tfjs-node (or @tensorflow/tfjs-node-gpu with CUDA) on a host that can " +
  "download libtensorflow, allowing its install script (npm 11: `npm install-scripts`)"

/** An explicit argument wins; "auto" or nothing defers to FLOTILLA_BACKEND, then auto. */
export const resolvePreference = (
  preference?: BackendPreference,
  env: string | undefined = process.env.FLOTILLA_BACKEND
): BackendPreference => {
  if (preference !== undefined && preference !== "auto") return checkPreference(preference, "argument")
  if (env !== undefined && env.trim() !== "") return checkPreference(env.trim().toLowerCase(), "FLOTILLA_BACKEND")
  return "auto"
}

const checkPreference = (p: string, source: string): BackendPreference => {
  if ((PREFERENCES as readonly string[]).includes(p)) return p as BackendPreference
  throw new BackendUnavailableError({
    preference: "auto",
    message: `Unknown compute backend "${p}" (from ${source}); expected one of ${PREFERENCES.join(", ")}`
  })
}

const errorText = (e: unknown): string => (e instanceof Error ? e.message : String(e)).split("\n")[0]

const importFailure = (e: unknown): string =>
  (e as { code?: unknown } | null)?.code === "ERR_MODULE_NOT_FOUND" ? "not installed" : errorText(e)

type Attempt = { readonly ok: true; readonly detail: string } | { readonly ok: false; readonly why: string }

/** Import a native tfjs-node package (it registers the "tensorflow" backend as a side
 *  effect) and switch to it. The module name is a variable so that TypeScript does not
 *  need the optional package's types. */
const tryTensorflow = async (): Promise<Attempt> => {
  const failures: string[] = []
  for (const pkg of ["@tensorflow/tfjs-node-gpu", "@tensorflow/tfjs-node"]) {
    try {
      const name: string = pkg
      await import(name)
    } catch (e) {
      failures.push(`${pkg}: ${importFailure(e)}`)
      continue
    }
    if (tf.findBackendFactory("tensorflow") === null) {
      failures.push(
        `${pkg} loaded but registered its backend in another copy of @tensorflow/tfjs-core ` +
          `(versions differ from @tensorflow/tfjs ${tf.version_core}; run npm dedupe)`
      )
      continue
    }
    if (await tf.setBackend("tensorflow")) return { ok: true, detail: `via ${pkg}` }
    failures.push(`${pkg}: the "tensorflow" backend failed to initialise`)
  }
  return { ok: false, why: failures.join("; ") }
}

/** Load the wasm backend from its package's dist folder (Node cannot fetch it by URL). */
const tryWasm = async (): Promise<Attempt> => {
  try {
    const wasm = await import("@tensorflow/tfjs-backend-wasm")
    const entry = createRequire(import.meta.url).resolve("@tensorflow/tfjs-backend-wasm")
    wasm.setWasmPaths(path.dirname(entry) + path.sep)
    // tfjs' threaded wasm needs browser workers; under Node it is one thread (and
    // data parallelism across processes uses the cores). SIMD stays auto-detected.
    tf.env().set("WASM_HAS_MULTITHREAD_SUPPORT", false)
    if (!(await tf.setBackend("wasm"))) return { ok: false, why: "the wasm backend failed to initialise" }
    const simd = tf.env().getBool("WASM_HAS_SIMD_SUPPORT")
    const threads = tf.env().getBool("WASM_HAS_MULTITHREAD_SUPPORT")
    return { ok: true, detail: `SIMD ${simd ? "on" : "off"}, ${threads ? "multi-threaded" : "1 thread"}` }
  } catch (e) {
    return { ok: false, why: `@tensorflow/tfjs-backend-wasm: ${importFailure(e)}` }
  }
}

const tryCpu = async (): Promise<Attempt> =>
  (await tf.setBackend("cpu")) ? { ok: true, detail: "plain JavaScript" } : { ok: false, why: "cpu backend failed" }

const ATTEMPTS: Record<BackendName, () => Promise<Attempt>> = { tensorflow: tryTensorflow, wasm: tryWasm, cpu: tryCpu }

const select = async (preference: BackendPreference): Promise<BackendInfo> => {
  if (preference !== "auto") {
    const a = await ATTEMPTS[preference]()
    if (a.ok) return { name: preference, reason: `${preference} requested (${a.detail})` }
    const hint =
      preference === "tensorflow"
        ? `${INSTALL_TENSORFLOW}, or choose FLOTILLA_BACKEND=wasm`
        : preference === "wasm"
          ? "check that @tensorflow/tfjs-backend-wasm is installed at the version of @tensorflow/tfjs, or choose FLOTILLA_BACKEND=cpu"
          : "the cpu backend ships with @tensorflow/tfjs; reinstall it"
    throw new BackendUnavailableError({
      preference,
      message: `Compute backend "${preference}" is unavailable: ${a.why}. To fix: ${hint}.`
    })
  }
  const skipped: string[] = []
  for (const name of ["tensorflow", "wasm", "cpu"] as const) {
    const a = await ATTEMPTS[name]()
    if (a.ok) {
      const why = skipped.length === 0 ? "" : `; skipped ${skipped.join("; ")}`
      return { name, reason: `auto: ${name} (${a.detail})${why}` }
    }
    skipped.push(`${name} (${a.why})`)
  }
  throw new BackendUnavailableError({ preference, message: `No compute backend could start: ${skipped.join("; ")}` })
}

const cache = new Map<BackendPreference, Promise<BackendInfo>>()

/**
 * Pick, initialise and activate the tfjs backend. Idempotent per preference: the same
 * BackendInfo comes back, and the process is switched back to it if another call moved it.
 * Rejects with BackendUnavailableError when an explicit preference cannot start.
 */
export const initBackend = async (preference?: BackendPreference): Promise<BackendInfo> => {
  const resolved = resolvePreference(preference)
  let pending = cache.get(resolved)
  if (pending === undefined) {
    pending = select(resolved)
    cache.set(resolved, pending)
    pending.catch(() => cache.delete(resolved)) // a failure may be fixed by the caller; retry next time
  }
  const info = await pending
  if (tf.getBackend() !== info.name) await tf.setBackend(info.name)
  await tf.ready()
  registerKernels() // after the backend package's own registrations, which it replaces
  return info
}

/** The compute a process trains with. `tf` is the namespace every model op goes through. */
export class Compute extends Context.Service<
  Compute,
  {
    readonly backend: BackendName
    readonly reason: string
    /** Kernels Flotilla registered over the stock ones, "Name@backend" (kernels.ts). */
    readonly kernels: readonly string[]
    readonly tf: typeof tf
  }
>()("flotilla/shared/compute/Compute") {
  static readonly make = (preference?: BackendPreference) =>
    Effect.tryPromise({
      try: () => initBackend(preference),
      catch: (e) =>
        e instanceof BackendUnavailableError
          ? e
          : new BackendUnavailableError({ preference: preference ?? "auto", message: errorText(e) })
    }).pipe(
      Effect.map((info) => ({ backend: info.name, reason: info.reason, kernels: registerKernels(), tf })),
      Effect.tap((c) => Effect.logInfo(`compute backend: ${c.reason}; own kernels: ${c.kernels.join(", ")}`)),
      Effect.withSpan("Compute.make")
    )

  /** Layer that initialises the backend (argument > FLOTILLA_BACKEND > auto). */
  static readonly layer = (preference?: BackendPreference): Layer.Layer<Compute, BackendUnavailableError> =>
    Layer.effect(Compute, Compute.make(preference))
}
