// TaskService called from Node: @grpc/grpc-js with @grpc/proto-loader loading
// the project's own protos, at default client settings (4 MiB receive limit).
//
//   node suite.js --target 127.0.0.1:8080 --include DIR [--include DIR ...] --run ID
//
// Prints one JSON object per check ({"check": name, "ok": bool, ...}) and
// exits 0; tests/test_interop.py runs it against a real server on each store
// and checks, on the server side, what the calls left behind (e.g. that no
// cancelled batch was written). Tags carry the run id so checks can count.
'use strict';

const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const loader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

function parseArgs(argv) {
  const args = { include: [] };
  for (let i = 2; i < argv.length; i += 2) {
    const key = argv[i].replace(/^--/, '');
    if (key === 'include') args.include.push(argv[i + 1]);
    else args[key] = argv[i + 1];
  }
  if (!args.target || !args.run || args.include.length === 0) {
    throw new Error('usage: node suite.js --target HOST:PORT --include DIR... --run ID');
  }
  return args;
}

const args = parseArgs(process.argv);
const definition = loader.loadSync('tasks/v1/task_service.proto', {
  includeDirs: args.include,
  keepCase: true,
  enums: String,
  longs: String,
  defaults: false,
  oneofs: true,
});
const tasks = grpc.loadPackageDefinition(definition).tasks.v1;
const client = new tasks.TaskService(args.target, grpc.credentials.createInsecure());

// google.rpc.Status and its details, decoded the way any caller would.
const rpcRoot = new protobuf.Root();
rpcRoot.resolvePath = (origin, target) => {
  for (const dir of args.include) {
    const candidate = path.join(dir, target);
    if (fs.existsSync(candidate)) return candidate;
  }
  return protobuf.util.path.resolve(origin, target);
};
rpcRoot.loadSync(['google/rpc/status.proto', 'google/rpc/error_details.proto']);
const Status = rpcRoot.lookupType('google.rpc.Status');
const detailTypes = {
  'type.googleapis.com/google.rpc.ErrorInfo': rpcRoot.lookupType('google.rpc.ErrorInfo'),
  'type.googleapis.com/google.rpc.BadRequest': rpcRoot.lookupType('google.rpc.BadRequest'),
};

function statusDetails(err) {
  const raw = err.metadata && err.metadata.get('grpc-status-details-bin')[0];
  if (!raw) return null;
  const status = Status.decode(raw);
  const out = { code: status.code, message: status.message, errorInfo: null, fields: [] };
  for (const any of status.details) {
    const type = detailTypes[any.type_url || any.typeUrl];
    if (!type) continue;
    const detail = type.decode(any.value);
    if (type.name === 'ErrorInfo') out.errorInfo = { reason: detail.reason, domain: detail.domain, metadata: detail.metadata };
    else out.fields.push(...detail.fieldViolations.map((v) => v.field));
  }
  return out;
}

const CODE = grpc.status;
const codeName = (code) => Object.keys(CODE).find((k) => CODE[k] === code) || String(code);

function unary(method, request, options = {}) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + (options.timeoutMs || 10000));
    client[method](request, new grpc.Metadata(), { deadline }, (err, response) =>
      err ? reject(err) : resolve(response));
  });
}

function batch(requests, options = {}) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + (options.timeoutMs || 60000));
    const call = client.BatchCreateTasks(new grpc.Metadata(), { deadline }, (err, response) =>
      err ? reject(err) : resolve(response));
    for (const request of requests) call.write(request);
    if (options.cancelAfterMs !== undefined) setTimeout(() => call.cancel(), options.cancelAfterMs);
    else call.end();
  });
}

async function expectError(promise, code) {
  try {
    await promise;
  } catch (err) {
    if (err.code !== code) throw new Error(`expected ${codeName(code)}, got ${codeName(err.code)}: ${err.details}`);
    const details = statusDetails(err);
    if (!details || !details.errorInfo) throw new Error(`no google.rpc.Status details on ${codeName(code)}`);
    if (details.errorInfo.domain !== 'taskservice') throw new Error(`domain ${details.errorInfo.domain}`);
    return details;
  }
  throw new Error(`expected ${codeName(code)}, the call succeeded`);
}

function assert(condition, message) {
  if (!condition) throw new Error(message);
}

// Every field at its limit, in 4-byte characters: ~18 KB per task.
function largestTask(i, tag) {
  const wide = '\u{1F600}';
  return {
    task: {
      title: wide.repeat(200),
      description: wide.repeat(2000),
      assignee: wide.repeat(256),
      tags: [tag, ...Array.from({ length: 31 }, (_, t) => String(t).padStart(2, '0') + wide.repeat(62))],
    },
  };
}

const run = args.run;
const checks = {
  async crud() {
    const created = await unary('CreateTask', { task: { title: 'from node', tags: [`crud-${run}`] }, task_id: `node-${run}` });
    assert(created.name === `tasks/node-${run}`, `name ${created.name}`);
    const got = await unary('GetTask', { name: created.name });
    assert(got.etag === created.etag && got.title === 'from node', 'get differs from create');
    const updated = await unary('UpdateTask', {
      task: { name: created.name, state: 'STATE_DONE', etag: created.etag },
      update_mask: { paths: ['state'] },
    });
    assert(updated.state === 'STATE_DONE' && updated.etag !== created.etag, 'update did not apply');
    const stale = await expectError(
      unary('UpdateTask', { task: { name: created.name, title: 'late', etag: created.etag } }), CODE.ABORTED);
    assert(stale.errorInfo.reason === 'ETAG_MISMATCH', `reason ${stale.errorInfo.reason}`);
    await unary('DeleteTask', { name: created.name, etag: updated.etag });
    const missing = await expectError(unary('GetTask', { name: created.name }), CODE.NOT_FOUND);
    assert(missing.errorInfo.reason === 'TASK_NOT_FOUND', `reason ${missing.errorInfo.reason}`);
    return { etags: [created.etag, updated.etag] };
  },

  async invalidArgument() {
    const details = await expectError(unary('CreateTask', { task: { title: '' }, task_id: 'BAD' }), CODE.INVALID_ARGUMENT);
    assert(details.fields.includes('task.title') && details.fields.includes('task_id'), `fields ${details.fields}`);
    return { reason: details.errorInfo.reason, fields: details.fields };
  },

  async batch500() {
    const requests = Array.from({ length: 500 }, (_, i) => ({ task: { title: `node ${i}`, tags: [`batch-${run}`] } }));
    const response = await batch(requests);
    assert(response.tasks.length === 500, `got ${response.tasks.length}`);
    assert(response.tasks.every((t, i) => t.title === `node ${i}`), 'not in stream order');
    return { created: response.tasks.length };
  },

  async batch501() {
    const requests = Array.from({ length: 501 }, (_, i) => ({ task: { title: `over ${i}`, tags: [`over-${run}`] } }));
    const details = await expectError(batch(requests), CODE.INVALID_ARGUMENT);
    assert(details.fields.includes('requests'), `fields ${details.fields}`);
    return { reason: details.errorInfo.reason };
  },

  async pagingToTheEnd() {
    const seen = new Set();
    let token = '';
    let pages = 0;
    do {
      const page = await unary('ListTasks', { filter: `tags:"batch-${run}"`, page_size: 37, page_token: token });
      for (const t of page.tasks) {
        assert(!seen.has(t.name), `${t.name} repeated`);
        seen.add(t.name);
      }
      token = page.next_page_token;
      pages += 1;
    } while (token);
    assert(seen.size === 500, `listed ${seen.size}`);
    return { listed: seen.size, pages };
  },

  async oneMillisecondDeadline() {
    const requests = Array.from({ length: 200 }, (_, i) => ({ task: { title: `late ${i}`, tags: [`deadline-${run}`] } }));
    try {
      await batch(requests, { timeoutMs: 1 });
    } catch (err) {
      assert(err.code === CODE.DEADLINE_EXCEEDED, `got ${codeName(err.code)}`);
      return { code: 'DEADLINE_EXCEEDED' };
    }
    throw new Error('a 1 ms deadline did not expire');
  },

  async cancelMidStream() {
    const codes = {};
    for (let i = 0; i < 40; i += 1) {
      const items = Array.from({ length: 5 }, (_, j) => ({ task: { title: `c${i}-${j}`, tags: [`cancel-${run}`] } }));
      try {
        await batch(items, { cancelAfterMs: 20 });
        codes.OK = (codes.OK || 0) + 1;
      } catch (err) {
        codes[codeName(err.code)] = (codes[codeName(err.code)] || 0) + 1;
      }
    }
    assert(codes.CANCELLED === 40, `codes ${JSON.stringify(codes)}`);
    return { codes };
  },

  async defaultLimitBatch() {
    const tooBig = Array.from({ length: 500 }, (_, i) => largestTask(i, `big-${run}`));
    const details = await expectError(batch(tooBig), CODE.INVALID_ARGUMENT);
    assert(details.errorInfo.reason === 'BATCH_RESPONSE_TOO_LARGE', `reason ${details.errorInfo.reason}`);
    const limit = Number(details.errorInfo.metadata.limit_bytes);
    const size = Number(details.errorInfo.metadata.size_bytes);
    assert(size > limit && limit > 0, `limit ${limit} size ${size}`);
    // The largest batch that fits is received by this default-settings client.
    const fits = Math.floor(limit / 18500);
    const response = await batch(Array.from({ length: fits }, (_, i) => largestTask(i, `fits-${run}`)));
    assert(response.tasks.length === fits, `got ${response.tasks.length}`);
    return { limit_bytes: limit, refused_size_bytes: size, largest_received: fits };
  },
};

(async () => {
  for (const [name, check] of Object.entries(checks)) {
    const started = Date.now();
    try {
      const figures = await check();
      console.log(JSON.stringify({ check: name, ok: true, ms: Date.now() - started, ...figures }));
    } catch (err) {
      console.log(JSON.stringify({ check: name, ok: false, ms: Date.now() - started, error: String(err.message || err) }));
    }
  }
  client.close();
})();
