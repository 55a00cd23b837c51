"""The one runtime both worker kinds use: model, paged KV cache, block hashing, scheduler, sampler.

The engine knows nothing about tokenization, networking or processes: it takes token ids and returns
token ids. `block_hash` is torch-free and is the contract the router shares; nothing imported here at
package level may pull in torch.
"""
