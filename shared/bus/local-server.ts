// Implements: starting a local `nats-server` child process — for `flotilla up` when no
// server is given, and for tests (test/support/nats.ts). Writes a config file to a temp
// dir (host, port, max_payload, JetStream store), waits until the server accepts
// connections, and can stop or restart it on the same port and store dir.
// Does not own: connecting to it (shared/bus/nats.ts), clusters or accounts (infra/).
//
// The binary comes from $NATS_SERVER_BIN, PATH, /usr/sbin, /usr/bin or /usr/local/bin
// (Debian/Ubuntu: `apt-get install -y nats-server`, 2.9.x). Port 0 means "any free port":
// the server picks one (`port: -1`), we read it from its log and keep it for restarts.
import { spawn } from "node:child_process"
import type { ChildProcess } from "node:child_process"
import * as fs from "node:fs"
import * as net from "node:net"
import * as os from "node:os"
import * as path from "node:path"
import * as Effect from "effect/Effect"
import type * as Scope from "effect/Scope"

export interface LocalNatsServerOptions {
  /** Client port; 0 (default) = a free port chosen by the server, kept across restarts. */
  readonly port?: number
  /** Interface to listen on; default "127.0.0.1" (use "0.0.0.0" to serve other hosts). */
  readonly host?: string
  /** Largest message in bytes; server default 1 MiB, nats-server caps it at 64 MiB. */
  readonly maxPayload?: number
  /** Enable JetStream (for the JetStream checkpoint store). */
  readonly jetstream?: boolean
  /** JetStream store directory; default a temp dir removed by stop(). */
  readonly storeDir?: string
  /** Path to the binary; default: found as described at the top of this file. */
  readonly binary?: string
  /** How long to wait for the server to accept connections; default 15 s. */
  readonly startTimeoutMs?: number
}

export interface LocalNatsServer {
  readonly url: string
  readonly port: number
  readonly host: string
  /** Stops the server (SIGTERM, then SIGKILL after 5 s) and removes its temp dir. */
  stop(): Promise<void>
  /** Stops and starts it again on the same port with the same config and store dir. */
  restart(): Promise<void>
}

export class NatsServerNotFoundError extends Error {
  override readonly name = "NatsServerNotFoundError"
}

const SEARCH_DIRS = ["/usr/sbin", "/usr/bin", "/usr/local/bin", "/usr/local/sbin"]

/** The nats-server binary's path, or undefined when none is installed. */
export const findNatsServerBinary = (): string | undefined => {
  const fromEnv = process.env["NATS_SERVER_BIN"]
  if (fromEnv !== undefined && fromEnv !== "" && isExecutable(fromEnv)) return fromEnv
  const dirs = [...(process.env["PATH"] ?? "").split(path.delimiter).filter((d) => d !== ""), ...SEARCH_DIRS]
  for (const dir of dirs) {
    const candidate = path.join(dir, "nats-server")
    if (isExecutable(candidate)) return candidate
  }
  return undefined
}

const isExecutable = (file: string): boolean => {
  try {
    fs.accessSync(file, fs.constants.X_OK)
    return fs.statSync(file).isFile()
  } catch {
    return false
  }
}

export const startLocalNatsServer = async (options: LocalNatsServerOptions = {}): Promise<LocalNatsServer> => {
  const binary = options.binary ?? findNatsServerBinary()
  if (binary === undefined || !isExecutable(binary)) {
    throw new NatsServerNotFoundError(
      (options.binary !== undefined
        ? `nats-server binary ${options.binary} not found or not executable. `
        : "nats-server binary not found (looked at $NATS_SERVER_BIN, PATH, " + SEARCH_DIRS.join(", ") + "). ") +
        "Install it: `apt-get install -y nats-server` (Debian/Ubuntu), `brew install nats-server` (macOS), " +
        "or download a release from https://github.com/nats-io/nats-server/releases; " +
        "or point Flotilla at a running server (--nats nats://host:4222 / $NATS_URL)."
    )
  }
  const host = options.host ?? "127.0.0.1"
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "flotilla-nats-"))
  const storeDir = options.storeDir ?? path.join(dir, "jetstream")
  const configFile = path.join(dir, "nats-server.conf")
  const timeoutMs = options.startTimeoutMs ?? 15_000
  let port = options.port ?? 0
  let child: ChildProcess | undefined

  const writeConfig = () => {
    const lines = [
      `host: ${JSON.stringify(host)}`,
      `port: ${port === 0 ? -1 : port}`
    ]
    if (options.maxPayload !== undefined) lines.push(`max_payload: ${options.maxPayload}`)
    if (options.jetstream === true) lines.push(`jetstream {`, `  store_dir: ${JSON.stringify(storeDir)}`, `}`)
    fs.writeFileSync(configFile, lines.join("\n") + "\n")
  }

  const killOnExit = () => {
    child?.kill("SIGKILL")
  }

  const launch = async () => {
    writeConfig()
    const started = await spawnAndWait(binary, configFile, host === "0.0.0.0" ? "127.0.0.1" : host, timeoutMs)
    child = started.child
    port = started.port
    process.once("exit", killOnExit)
  }

  const kill = async () => {
    const c = child
    child = undefined
    process.removeListener("exit", killOnExit)
    if (c !== undefined) await terminate(c)
  }

  try {
    await launch()
  } catch (e) {
    fs.rmSync(dir, { recursive: true, force: true })
    throw e
  }
  const urlHost = host === "0.0.0.0" ? "127.0.0.1" : host
  const fixedPort = port
  return {
    url: `nats://${urlHost}:${fixedPort}`,
    port: fixedPort,
    host,
    stop: async () => {
      await kill()
      fs.rmSync(dir, { recursive: true, force: true })
    },
    restart: async () => {
      await kill()
      await launch()
    }
  }
}

/** The same, as a scoped resource: stopped when the scope closes. */
export const localNatsServer = (options: LocalNatsServerOptions = {}): Effect.Effect<LocalNatsServer, Error, Scope.Scope> =>
  Effect.acquireRelease(
    Effect.tryPromise({ try: () => startLocalNatsServer(options), catch: (e) => (e instanceof Error ? e : new Error(String(e))) }),
    (server) => Effect.promise(() => server.stop())
  )

const LISTENING = /Listening for client connections on ([^\s:]+|\[[^\]]+\]):(\d+)/

/** Spawns the server and resolves once it logged "Server is ready" and a TCP connect succeeds. */
const spawnAndWait = (binary: string, configFile: string, connectHost: string, timeoutMs: number) =>
  new Promise<{ child: ChildProcess; port: number }>((resolve, reject) => {
    const child = spawn(binary, ["-c", configFile], { stdio: ["ignore", "pipe", "pipe"] })
    const tail: Array<string> = []
    let port: number | undefined
    let settled = false
    const fail = (why: string) => {
      if (settled) return
      settled = true
      clearTimeout(timer)
      child.kill("SIGKILL")
      reject(new Error(`nats-server ${why}\n  config: ${configFile}\n  log tail:\n    ${tail.join("\n    ")}`))
    }
    const timer = setTimeout(() => fail(`did not become ready within ${timeoutMs} ms`), timeoutMs)
    const onLine = (line: string) => {
      tail.push(line)
      if (tail.length > 30) tail.shift()
      if (settled) return
      const m = LISTENING.exec(line)
      if (m !== null) port = Number(m[2])
      if (line.includes("Server is ready")) {
        if (port === undefined) return fail("is ready but logged no client port")
        const p = port
        waitForTcp(connectHost, p, timeoutMs).then(
          () => {
            if (settled) return
            settled = true
            clearTimeout(timer)
            resolve({ child, port: p })
          },
          (e) => fail(`accepts no connections on port ${p}: ${String(e)}`)
        )
      }
    }
    for (const stream of [child.stdout, child.stderr]) {
      let buffered = ""
      stream?.setEncoding("utf8")
      stream?.on("data", (chunk: string) => {
        buffered += chunk
        let nl: number
        while ((nl = buffered.indexOf("\n")) >= 0) {
          onLine(buffered.slice(0, nl))
          buffered = buffered.slice(nl + 1)
        }
      })
    }
    child.once("error", (e) => fail(`failed to start (${binary}): ${e.message}`))
    child.once("exit", (code, signal) => fail(`exited early (code ${code}, signal ${signal})`))
  })

const waitForTcp = (host: string, port: number, timeoutMs: number): Promise<void> => {
  const deadline = Date.now() + timeoutMs
  return new Promise((resolve, reject) => {
    const attempt = () => {
      const socket = net.connect({ host, port })
      socket.once("connect", () => {
        socket.destroy()
        resolve()
      })
      socket.once("error", (e) => {
        socket.destroy()
        if (Date.now() > deadline) reject(e)
        else setTimeout(attempt, 50)
      })
    }
    attempt()
  })
}

const terminate = (child: ChildProcess): Promise<void> =>
  new Promise((resolve) => {
    if (child.exitCode !== null || child.signalCode !== null) return resolve()
    const hard = setTimeout(() => child.kill("SIGKILL"), 5_000)
    child.once("exit", () => {
      clearTimeout(hard)
      resolve()
    })
    child.kill("SIGTERM")
  })
