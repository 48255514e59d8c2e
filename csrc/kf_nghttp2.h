/* libnghttp2 calls that not every supported build of the library has.
 *
 * The engine builds against libnghttp2 >= 1.52 (Debian 12). nghttp2 1.57 added a limit on
 * the RST_STREAM frames a server accepts (on by default: 1000 at once, 33 per second), and
 * Debian backported it to its 1.52 (1.52.0-1+deb12u1). The engine counts resets with every
 * other control frame instead (csrc/h2_flood.pxi), so it switches that limit off where the
 * library has it. The symbol is weak: against a library without it the module still loads,
 * and there is nothing to switch off.
 */
#ifndef KF_NGHTTP2_H
#define KF_NGHTTP2_H

#include <stdint.h>
#include <nghttp2/nghttp2.h>

void nghttp2_option_set_stream_reset_rate_limit(nghttp2_option *option, uint64_t burst,
                                                uint64_t rate) __attribute__((weak));

/* Switch off nghttp2's own stream-reset limit; 1 if the library has one, else 0. */
static inline int kf_option_disable_stream_reset_rate_limit(nghttp2_option *option)
{
    if (nghttp2_option_set_stream_reset_rate_limit == NULL)
        return 0;
    /* An inexhaustible bucket: nghttp2_ratelim_update caps the refill without overflow. */
    nghttp2_option_set_stream_reset_rate_limit(option, UINT64_MAX, UINT64_MAX);
    return 1;
}

/* Newer nghttp2 releases (1.68 and 1.70; not 1.52) also limit "glitches" (by default 1000
 * at once, 33 per second): frames they ignore or find suspicious (PRIORITY, empty DATA,
 * unknown frame types, refused HEADERS), ending the connection with ENHANCE_YOUR_CALM when
 * they come faster. The engine counts those with every other control frame
 * (csrc/h2_flood.pxi), the same on every release, so it switches this limit off too where
 * the library has it. */
void nghttp2_option_set_glitch_rate_limit(nghttp2_option *option, uint64_t burst,
                                          uint64_t rate) __attribute__((weak));

static inline int kf_option_disable_glitch_rate_limit(nghttp2_option *option)
{
    if (nghttp2_option_set_glitch_rate_limit == NULL)
        return 0;
    nghttp2_option_set_glitch_rate_limit(option, UINT64_MAX, UINT64_MAX);
    return 1;
}

#endif
