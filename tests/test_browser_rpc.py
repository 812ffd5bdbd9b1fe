"""RPC between the browser SDK (livekit-client in headless Chromium, Braid's meeting page) and the Python SDK,
both ways, with the error codes the SDKs define."""

from __future__ import annotations

import pytest
from livekit import api, rtc

from .servers import DEV_KEY, DEV_SECRET
from .test_browser import browser, chromium_path, fake_speech, wait_until  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


async def test_rpc_between_browser_and_python(browser, dev_server, room_name):  # noqa: F811
    token = (api.AccessToken(DEV_KEY, DEV_SECRET).with_identity("py-rpc")
             .with_grants(api.VideoGrants(room_join=True, room=room_name)).to_jwt())
    room = rtc.Room()
    await room.connect(dev_server.ws_url, token)
    try:
        room.local_participant.register_rpc_method(
            "py.echo", lambda data: f"python got {data.payload} from {data.caller_identity}")
        page = await browser.join(dev_server, "Browser", room_name)
        page_id = await page.identity()
        await page.js("""() => window.braidRoom.localParticipant.registerRpcMethod('page.echo',
            async (data) => `browser got ${data.payload} from ${data.callerIdentity}`)""")
        await wait_until(lambda: page.js(
            "() => [...window.braidRoom.remoteParticipants.values()].some(p => p.identity === 'py-rpc')"),
            timeout=15, what="the page to see the Python participant", pages=[page])

        # Browser → Python.
        answer = await page.js("""() => window.braidRoom.localParticipant.performRpc(
            {destinationIdentity: 'py-rpc', method: 'py.echo', payload: 'hi'})""")
        assert answer == f"python got hi from {page_id}"
        failure = await page.js("""() => window.braidRoom.localParticipant.performRpc(
            {destinationIdentity: 'py-rpc', method: 'missing', payload: ''}).then(() => null, e => e.code)""")
        assert failure == 1400  # unsupported method

        # Python → browser.
        assert await room.local_participant.perform_rpc(
            destination_identity=page_id, method="page.echo", payload="hello") == "browser got hello from py-rpc"
        with pytest.raises(rtc.RpcError) as missing:
            await room.local_participant.perform_rpc(destination_identity=page_id, method="missing", payload="")
        assert missing.value.code == 1400
    finally:
        await room.disconnect()
