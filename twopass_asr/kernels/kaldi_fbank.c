/* Kaldi's log mel filterbank frames with the bits kaldi-native-fbank gives, for many frames a call.
 *
 * kaldi-native-fbank (FunASR's fbank) sets up its FFT afresh for every frame, a sine and a cosine
 * for each of its tables' entries. Here the tables are computed once, and the same float
 * operations as kaldi-native-fbank's are done in the same order: the frame's mean removed (a
 * serial sum), pre-emphasis, the window, the real FFT of the zero-padded frame as KISS FFT
 * computes it (a radix-4 complex FFT of half the length over the even and odd samples, then the
 * split into the real transform), the power spectrum, the mel bins' serial sums and their floored
 * log. Built with -ffp-contract=off, as kaldi-native-fbank is built without fused multiply-adds.
 * A vector's lanes hold different frames, so each lane does exactly one frame's scalar operations. */

#include <math.h>
#include <stdint.h>

#include "vector_lanes.h"

typedef struct {
    int64_t frame_length; /* samples a frame */
    int64_t frame_shift;
    int64_t fft_length; /* twice a power of 4, at least frame_length */
    int64_t remove_dc_offset;
    float preemphasis; /* 0 for none */
    float log_floor;   /* energies below it are raised to it before the log */
    const float *window; /* frame_length */
    int64_t bins;
    const int64_t *bin_first; /* bins: each mel bin's first FFT bin */
    const int64_t *bin_size;  /* bins: its number of weights */
    const float *bin_weights; /* every bin's weights, bin after bin */
    /* From fbank_fft_tables: (re, im) pairs. */
    const float *twiddles;      /* fft_length / 2 */
    const float *real_twiddles; /* fft_length / 4 */
    const int32_t *order;       /* fft_length / 2 */
} fbank_plan;

/* The tables of an fft_length real FFT (fft_length / 2 a power of 4, at least 4). Twiddles as
 * KISS FFT makes them: the angle in double, its cosine and sine rounded to float. `order` is the
 * complex input each slot of the complex FFT starts from: the input decimated by 4 stage by stage,
 * as KISS FFT's recursion reads it (slot digits in base 4 reversed). */
void fbank_fft_tables(int64_t fft_length, float *twiddles, float *real_twiddles, int32_t *order) {
    const int64_t points = fft_length / 2;
    const double pi = 3.14159265358979323846264338327950288;
    for (int64_t k = 0; k < points; ++k) {
        const double angle = -2 * pi * k / points;
        twiddles[2 * k] = (float)cos(angle);
        twiddles[2 * k + 1] = (float)sin(angle);
    }
    for (int64_t k = 0; k < points / 2; ++k) {
        const double angle = -pi * ((double)(k + 1) / points + .5);
        real_twiddles[2 * k] = (float)cos(angle);
        real_twiddles[2 * k + 1] = (float)sin(angle);
    }
    for (int64_t slot = 0; slot < points; ++slot) {
        int64_t reversed = 0;
        for (int64_t rest = slot, span = points; span > 1; span /= 4, rest /= 4)
            reversed = reversed * 4 + rest % 4;
        order[slot] = (int32_t)reversed;
    }
}

typedef struct {
    float_lanes re, im;
} complex_lanes;

/* One radix-4 stage over `points` complex values: in each group of 4 `span`, the four quarters'
 * butterflies, the twiddles `stride` apart.
 *
 * KISS FFT is built with -ffast-math, and its compiler regrouped the butterfly's real parts: the
 * real part of a twiddled quarter is never formed, its two products are added to or taken from
 * the other term one at a time. These are the sums the library's machine code computes. */
static void radix4_stage(complex_lanes *z, int64_t points, int64_t span, int64_t stride, const float *twiddles) {
    for (int64_t group = 0; group < points; group += 4 * span) {
        complex_lanes *f = z + group;
        for (int64_t k = 0; k < span; ++k) {
            const float *w1 = twiddles + 2 * (k * stride), *w2 = twiddles + 2 * (2 * k * stride),
                        *w3 = twiddles + 2 * (3 * k * stride);
            const complex_lanes a0 = f[k], a1 = f[k + span], a2 = f[k + 2 * span], a3 = f[k + 3 * span];
            const float_lanes first_re = a1.re * w1[0] - a1.im * w1[1], first_im = a1.re * w1[1] + a1.im * w1[0];
            const float_lanes second_rr = a2.re * w2[0], second_ii = a2.im * w2[1];
            const float_lanes second_im = a2.re * w2[1] + a2.im * w2[0];
            const float_lanes third_rr = a3.re * w3[0], third_ii = a3.im * w3[1];
            const float_lanes third_im = a3.re * w3[1] + a3.im * w3[0];
            const float_lanes even_sum_re = (a0.re + second_rr) - second_ii, even_sum_im = a0.im + second_im;
            const float_lanes even_difference_re = (a0.re + second_ii) - second_rr;
            const float_lanes even_difference_im = a0.im - second_im;
            const float_lanes odd_sum_re = (first_re - third_ii) + third_rr, odd_sum_im = first_im + third_im;
            const float_lanes odd_difference_re = (first_re - third_rr) + third_ii;
            f[k].re = even_sum_re + odd_sum_re;
            f[k].im = even_sum_im + odd_sum_im;
            f[k + 2 * span].re = even_sum_re - odd_sum_re;
            f[k + 2 * span].im = even_sum_im - odd_sum_im;
            f[k + span].re = (even_difference_re + first_im) - third_im;
            f[k + span].im = even_difference_im - odd_difference_re;
            f[k + 3 * span].re = (even_difference_re + third_im) - first_im;
            f[k + 3 * span].im = even_difference_im + odd_difference_re;
        }
    }
}

/* The power spectrum (fft_length / 2 + 1 bins) of each lane's frame in `x` (fft_length samples). */
static void power_spectrum(const fbank_plan *plan, const float_lanes *x, complex_lanes *z, float_lanes *power) {
    const int64_t points = plan->fft_length / 2;
    for (int64_t slot = 0; slot < points; ++slot) {
        z[slot].re = x[2 * plan->order[slot]];
        z[slot].im = x[2 * plan->order[slot] + 1];
    }
    /* Innermost stage first, as the recursion returns. */
    for (int64_t span = 1; span < points; span *= 4)
        radix4_stage(z, points, span, points / (4 * span), plan->twiddles);

    /* The two real transforms packed in z into the one of the whole frame, bin k and
     * points - k together; each bin's power as the real and imaginary parts' squares' sum. */
    const float_lanes dc = z[0].re + z[0].im, nyquist = z[0].re - z[0].im;
    power[0] = dc * dc;
    power[points] = nyquist * nyquist;
    const float half = .5f;
    for (int64_t k = 1; k <= points / 2; ++k) {
        const complex_lanes low = z[k], high = z[points - k];
        const float_lanes sum_re = low.re + high.re, difference_re = low.re - high.re;
        const float_lanes sum_im = low.im - high.im, difference_im = low.im + high.im;
        const float *w = plan->real_twiddles + 2 * (k - 1);
        /* The turned difference's real part regrouped as in the radix-4 stage. */
        const float_lanes turned_rr = difference_re * w[0], turned_ii = difference_im * w[1];
        const float_lanes turned_im = difference_re * w[1] + difference_im * w[0];
        const float_lanes re = ((sum_re + turned_rr) - turned_ii) * half, im = (sum_im + turned_im) * half;
        const float_lanes mirror_re = ((sum_re + turned_ii) - turned_rr) * half;
        const float_lanes mirror_im = (turned_im - sum_im) * half;
        /* At k = points / 2 both name one bin: the mirror's values, written last, stand. */
        if (k != points - k)
            power[k] = re * re + im * im;
        power[points - k] = mirror_re * mirror_re + mirror_im * mirror_im;
    }
}

/* `frames` frames' log mel energies (frames x bins) from `samples`, frame f starting at sample
 * f * frame_shift; the caller gives at least (frames - 1) * frame_shift + frame_length samples. */
void fbank_frames(const fbank_plan *plan, const float *samples, int64_t frames, float *features) {
    const int64_t length = plan->frame_length, points = plan->fft_length / 2;
    float_lanes x[plan->fft_length], power[points + 1];
    complex_lanes z[points];
    for (int64_t first = 0; first < frames; first += LANES) {
        /* Lanes past the last frame repeat it; their results are dropped. */
        for (int64_t lane = 0; lane < LANES; ++lane) {
            const int64_t frame = first + lane < frames ? first + lane : frames - 1;
            const float *in = samples + frame * plan->frame_shift;
            for (int64_t i = 0; i < length; ++i)
                x[i][lane] = in[i];
        }
        if (plan->remove_dc_offset) {
            float_lanes sum = {0};
            for (int64_t i = 0; i < length; ++i)
                sum += x[i];
            const float_lanes mean = sum / (float)length;
            for (int64_t i = 0; i < length; ++i)
                x[i] -= mean;
        }
        if (plan->preemphasis != 0.0f) {
            for (int64_t i = length - 1; i > 0; --i)
                x[i] -= plan->preemphasis * x[i - 1];
            x[0] -= plan->preemphasis * x[0];
        }
        for (int64_t i = 0; i < length; ++i)
            x[i] *= plan->window[i];
        for (int64_t i = length; i < plan->fft_length; ++i)
            x[i] = (float_lanes){0};

        power_spectrum(plan, x, z, power);

        const int64_t count = frames - first < LANES ? frames - first : LANES;
        const float *weights = plan->bin_weights;
        for (int64_t bin = 0; bin < plan->bins; ++bin) {
            float_lanes energy = {0};
            const float_lanes *spectrum = power + plan->bin_first[bin];
            for (int64_t k = 0; k < plan->bin_size[bin]; ++k)
                energy += weights[k] * spectrum[k];
            weights += plan->bin_size[bin];
            for (int64_t lane = 0; lane < count; ++lane) {
                const float e = energy[lane];
                features[(first + lane) * plan->bins + bin] = logf(e < plan->log_floor ? plan->log_floor : e);
            }
        }
    }
}
