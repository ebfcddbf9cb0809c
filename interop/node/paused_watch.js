// A grpc-js WatchTasks caller that pause()s reading: what a Node client that
// stops consuming a stream (back-pressure) does to the server.
//
//   node paused_watch.js --target HOST:PORT --include DIR [--include DIR ...] --pause-ms N
//
// Opens a watch, reads TYPE_CURRENT, prints {"paused": true}, pauses for N ms,
// then reads on until the stream ends and prints one JSON object: the events
// received, the last one's resume_token, and the status it ended with (code,
// ErrorInfo reason and metadata). tests/test_interop.py drives it.
'use strict';

const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const loader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const args = { include: [] };
for (let i = 2; i < process.argv.length; i += 2) {
  const key = process.argv[i].replace(/^--/, '');
  if (key === 'include') args.include.push(process.argv[i + 1]);
  else args[key] = process.argv[i + 1];
}
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
const ErrorInfo = rpcRoot.lookupType('google.rpc.ErrorInfo');

const call = client.WatchTasks({});
let events = 0;
let lastToken = '';
let paused = false;
call.on('data', (event) => {
  events += 1;
  lastToken = event.resume_token;
  if (!paused && event.type === 'TYPE_CURRENT') {
    paused = true;
    call.pause();
    console.log(JSON.stringify({ paused: true }));
    setTimeout(() => call.resume(), Number(args['pause-ms']));
  }
});
call.on('error', () => {}); // the status handler below reports it
call.on('status', (status) => {
  const out = { events, last_token: lastToken, code: status.code, reason: '', metadata: {} };
  const raw = status.metadata && status.metadata.get('grpc-status-details-bin')[0];
  if (raw) {
    for (const any of Status.decode(raw).details) {
      if ((any.type_url || any.typeUrl).endsWith('google.rpc.ErrorInfo')) {
        const info = ErrorInfo.decode(any.value);
        out.reason = info.reason;
        out.metadata = info.metadata;
      }
    }
  }
  console.log(JSON.stringify(out));
  client.close();
});
