// The decode launchers for bf16, one per head dim this build compiles (setup.py's
// FLASH_ATTN_EXT_HDIMS / FLASH_ATTN_EXT_DTYPES). Written by hand: per head dim the decode
// kernels of its configurations (flash_decode_launch.cuh), with and without score mods, and the combine.
#include "flash_decode_launch.cuh"

#ifdef FLASH_ATTN_EXT_DTYPE_BF16
#ifdef FLASH_ATTN_EXT_HDIM_32
template int plan_flash_decode<__nv_bfloat16, 32>(FlashKvcacheParams&, int);
template void run_flash_decode<__nv_bfloat16, 32>(const FlashKvcacheParams&, cudaStream_t);
#endif
#ifdef FLASH_ATTN_EXT_HDIM_64
template int plan_flash_decode<__nv_bfloat16, 64>(FlashKvcacheParams&, int);
template void run_flash_decode<__nv_bfloat16, 64>(const FlashKvcacheParams&, cudaStream_t);
#endif
#ifdef FLASH_ATTN_EXT_HDIM_96
template int plan_flash_decode<__nv_bfloat16, 96>(FlashKvcacheParams&, int);
template void run_flash_decode<__nv_bfloat16, 96>(const FlashKvcacheParams&, cudaStream_t);
#endif
#ifdef FLASH_ATTN_EXT_HDIM_128
template int plan_flash_decode<__nv_bfloat16, 128>(FlashKvcacheParams&, int);
template void run_flash_decode<__nv_bfloat16, 128>(const FlashKvcacheParams&, cudaStream_t);
#endif
#ifdef FLASH_ATTN_EXT_HDIM_192
template int plan_flash_decode<__nv_bfloat16, 192>(FlashKvcacheParams&, int);
template void run_flash_decode<__nv_bfloat16, 192>(const FlashKvcacheParams&, cudaStream_t);
#endif
#ifdef FLASH_ATTN_EXT_HDIM_256
template int plan_flash_decode<__nv_bfloat16, 256>(FlashKvcacheParams&, int);
template void run_flash_decode<__nv_bfloat16, 256>(const FlashKvcacheParams&, cudaStream_t);
#endif
#endif
