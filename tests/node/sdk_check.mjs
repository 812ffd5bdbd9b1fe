// What a Node app does with the official SDKs against Braid, driven by tests/test_node_sdks.py:
//   node sdk_check.mjs <ws_url> <http_url> <api_key> <api_secret> <room>
// Two @livekit/rtc-node participants call each other and a Python participant ("py", method "py-echo") over
// RPC; livekit-server-sdk lists, updates and messages them and manages an agent dispatch. Prints one line
// `RESULT <json>`, then `READY` once "node-a" answers "node-echo" for the Python side, and exits when "py"
// sends data on topic "done" (or after 30 s).
import { AgentDispatchClient, AccessToken, DataPacket_Kind, RoomServiceClient } from 'livekit-server-sdk';
import { Room, RoomEvent, RpcError, dispose } from '@livekit/rtc-node';

const [wsUrl, httpUrl, apiKey, apiSecret, roomName] = process.argv.slice(2);

async function token(identity) {
  const at = new AccessToken(apiKey, apiSecret, { identity });
  at.addGrant({ roomJoin: true, room: roomName, canPublish: true, canSubscribe: true, canPublishData: true });
  return at.toJwt();
}

async function until(check, seconds) {
  const deadline = Date.now() + seconds * 1000;
  while (Date.now() < deadline) {
    if (check()) return true;
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  return check();
}

async function rpcError(call) {
  try {
    await call();
    return null;
  } catch (err) {
    return err instanceof RpcError ? err.code : String(err);
  }
}

const a = new Room();
const b = new Room();
const result = {};
try {
  await a.connect(wsUrl, await token('node-a'), { autoSubscribe: true, dynacast: true });
  a.localParticipant.registerRpcMethod('node-echo', async (data) =>
    JSON.stringify({ caller: data.callerIdentity, payload: data.payload }));
  const received = [];
  a.on(RoomEvent.DataReceived, (payload, participant, kind, topic) =>
    received.push({ text: new TextDecoder().decode(payload), from: participant?.identity ?? '', topic }));
  let done = false;
  a.on(RoomEvent.DataReceived, (payload, participant, kind, topic) => { if (topic === 'done') done = true; });

  await b.connect(wsUrl, await token('node-b'), { autoSubscribe: true, dynacast: true });
  result.roomName = b.name;  // RPC below also passes the Rust core's gate on the server's version (>= 1.8.0)
  result.nodeToNode = JSON.parse(await b.localParticipant.performRpc({
    destinationIdentity: 'node-a', method: 'node-echo', payload: 'from b' }));
  result.nodeToPython = await b.localParticipant.performRpc({
    destinationIdentity: 'py', method: 'py-echo', payload: 'from node' });
  result.unsupportedMethod = await rpcError(() => b.localParticipant.performRpc({
    destinationIdentity: 'node-a', method: 'no-such-method', payload: '' }));
  result.nobodyThere = await rpcError(() => b.localParticipant.performRpc({
    destinationIdentity: 'nobody', method: 'node-echo', payload: '', responseTimeout: 3000 }));

  const rooms = new RoomServiceClient(httpUrl, apiKey, apiSecret);
  result.listed = (await rooms.listParticipants(roomName)).map((p) => p.identity).sort();
  await rooms.updateParticipant(roomName, 'node-b', { metadata: 'set by the server sdk' });
  result.metadataSeen = await until(() => b.localParticipant.metadata === 'set by the server sdk', 10);
  await rooms.sendData(roomName, new TextEncoder().encode('hello a'), DataPacket_Kind.RELIABLE,
    { destinationIdentities: ['node-a'], topic: 'greeting' });
  result.dataSeen = await until(() => received.some((m) => m.topic === 'greeting'), 10)
    ? received.find((m) => m.topic === 'greeting') : null;

  const agents = new AgentDispatchClient(httpUrl, apiKey, apiSecret);
  const dispatch = await agents.createDispatch(roomName, 'node-agent', { metadata: 'from node' });
  result.dispatchListed = (await agents.listDispatch(roomName))
    .filter((d) => d.id === dispatch.id).map((d) => [d.agentName, d.metadata]);
  await agents.deleteDispatch(dispatch.id, roomName);
  result.dispatchAfterDelete = (await agents.listDispatch(roomName)).filter((d) => d.id === dispatch.id).length;

  console.log(`RESULT ${JSON.stringify(result)}`);
  console.log('READY');
  await until(() => done, 30);
} catch (err) {
  console.log(`RESULT ${JSON.stringify({ ...result, error: String(err?.stack ?? err) })}`);
} finally {
  await b.disconnect();
  await a.disconnect();
  await dispose();
}
